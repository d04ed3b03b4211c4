"""Which approach (prompt, RAG, fine-tune) and which training method, decided from a few answers.

The rules are tables below, so they can be read, argued with and tested as data. The thresholds are rules of
thumb from the cited papers and common practice, not measurements of this project.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import ConfigError
from posttrain.plan.arch import Arch, load_arch
from posttrain.plan.memory import GB, SLACK_PERCENT, plan_memory

# (what must change, how often it changes) -> (approach, why)
APPROACHES: dict[tuple[str, str], tuple[str, str]] = {
    ("behaviour", "stable"): (
        "fine-tune",
        "a stable behaviour, format or style is learned once by fine-tuning and then costs no prompt tokens "
        "on any query"),
    ("behaviour", "volatile"): (
        "prompt",
        "behaviour that keeps changing is cheaper to edit in a prompt than to retrain after every change"),
    ("knowledge", "volatile"): (
        "RAG",
        "knowledge that keeps changing is served fresh by retrieval, while a fine-tune is stale after the next "
        "update"),
    ("knowledge", "stable"): (
        "RAG first",
        "fine-tuning injects new facts poorly and can raise hallucination (Ovadia et al. 2023, 'Fine-Tuning or "
        "Retrieval?'; Gekhman et al. 2024), so retrieve the facts; fine-tune later only for the answer format "
        "if prompting cannot hold it"),
}

# goal -> (training objective, why)
OBJECTIVES: dict[str, tuple[str, str]] = {
    "imitate": ("SFT", "you have demonstrations of the wanted answers, and supervised fine-tuning learns to "
                       "imitate them"),
    "prefer": ("DPO", "you have pairs of a preferred and a rejected answer, and DPO learns that preference "
                      "directly, without a reward model or sampling (Rafailov et al. 2023)"),
    "verifiable": ("GRPO", "a program can check an answer, so GRPO samples several answers per prompt and "
                           "learns from the checked rewards relative to the group (Shao et al. 2024)"),
}


@dataclass(frozen=True)
class DataBand:
    min_examples: int
    methods: tuple[str, ...]  # in order of preference; the first that fits the GPU wins
    why: str


# Ascending by min_examples; the last band whose minimum is reached applies.
DATA_BANDS: tuple[DataBand, ...] = (
    DataBand(0, ("lora", "qlora"),
             "so few examples that few-shot prompting may be enough; if you train, LoRA's few parameters "
             "overfit less, and a held-out loss tells when to stop"),
    DataBand(100, ("lora", "qlora"),
             "on data of this size LoRA matches full fine-tuning and forgets less of the base model "
             "(Biderman et al. 2024, 'LoRA Learns Less and Forgets Less'), at a fraction of the memory"),
    DataBand(100_000, ("full", "lora", "qlora"),
             "with this much data full fine-tuning learns more than LoRA (Biderman et al. 2024), so it comes "
             "first if it fits"),
)

METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}
# The advisor sizes adapters as the QLoRA paper recommends: every linear module, here at r=16.
ADVISOR_LORA = {"r": 16, "targets": "all-linear"}


@dataclass
class Decision:
    """The answer to one question, with one sentence per input that drove it."""

    question: str
    choice: str
    reasons: list[str]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "choice": self.choice, "reasons": self.reasons, **self.details}


def choose_approach(change: str, stability: str) -> Decision:
    """Prompt, RAG or fine-tune, from what must change (behaviour or knowledge) and how often it changes."""
    change, stability = _CHOICES["change"](change), _CHOICES["stability"](stability)
    choice, why = APPROACHES[(change, stability)]
    return Decision("approach", choice, [f"--change {change} --stability {stability}: {why}."])


def choose_method(goal: str, examples: int, vram_gb: float, arch: Arch, *, seq_len: int = 2048,
                  batch: int = 1) -> Decision:
    """The training objective from the goal, then full/LoRA/QLoRA: the first method that the data size
    prefers and whose memory plan (``plan_memory``) fits in ``vram_gb``."""
    goal = _CHOICES["goal"](goal)
    if examples < 0 or vram_gb <= 0:
        raise ConfigError(f"--examples must be >= 0 and --vram > 0, got {examples} and {vram_gb}")
    objective, why = OBJECTIVES[goal]
    reasons = [f"--goal {goal}: {objective}, because {why}."]
    band = [b for b in DATA_BANDS if examples >= b.min_examples][-1]
    reasons.append(f"--examples {examples:,}: {band.why}.")
    # DPO puts the chosen and the rejected answer through the model together; DPO and GRPO compare against a
    # frozen reference, which full fine-tuning must hold as a second copy.
    pair_batch = 2 * batch if objective == "DPO" else batch
    plans = {m: plan_memory(arch, m, seq_len=seq_len, batch=pair_batch, reference_model=objective != "SFT",
                            **ADVISOR_LORA) for m in band.methods}
    setup = (f"{arch.name}, seq {seq_len}, batch {pair_batch}{' (pairs)' if objective == 'DPO' else ''}, "
             "checkpointing on")
    verdicts = {m: p.fit(vram_gb) for m, p in plans.items()}
    chosen = next((m for m in band.methods if verdicts[m] == "fits"), None) \
        or next((m for m in band.methods if verdicts[m] == "marginal"), None)
    for m in band.methods:
        if m == chosen:
            break
        reasons.append(f"--vram {vram_gb:g}: {METHOD_NAMES[m]} needs {plans[m].total / GB:.1f} GB ({setup}), "
                       f"more than {vram_gb:g} GB.")
    details = {"objective": objective, "memory_gb": {m: round(p.total / GB, 2) for m, p in plans.items()}}
    if chosen is None:
        smallest = min(plans.values(), key=lambda p: p.total)
        reasons.append(f"Nothing fits one {vram_gb:g} GB GPU (the smallest, {METHOD_NAMES[smallest.method]}, needs "
                       f"{smallest.total / GB:.1f} GB): use a smaller model, shorter sequences, or shard the "
                       "model across GPUs (FSDP).")
        return Decision("method", f"{objective}: does not fit in {vram_gb:g} GB", reasons, details)
    plan = plans[chosen]
    verdict = "fits in" if verdicts[chosen] == "fits" else "is marginal on"
    reasons.append(f"--vram {vram_gb:g}: {METHOD_NAMES[chosen]} needs {plan.total / GB:.1f} GB ({setup}), which "
                   f"{verdict} {vram_gb:g} GB.")
    if verdicts[chosen] == "marginal":
        reasons.append(f"It fits only without the {SLACK_PERCENT}% slack: expect to shorten sequences or "
                       "batches if it runs out of memory.")
    if chosen == "lora" and "qlora" in band.methods:
        reasons.append("LoRA fits, so QLoRA's 4-bit weights (slower steps, quantization error) are not needed.")
    if objective == "GRPO":
        reasons.append("GRPO also generates a group of answers per prompt; their KV cache is not in this "
                       "estimate.")
    return Decision("method", f"{objective} + {METHOD_NAMES[chosen]}", reasons, details)


def _choice(name: str, options: tuple[str, ...], aliases: dict[str, str] | None = None) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = (aliases or {}).get(str(text).strip().lower(), str(text).strip().lower())
        if value not in options:
            raise ConfigError(f"--{name} must be one of {', '.join(options)}, got {text!r}")
        return value
    return parse


def _non_negative(name: str, kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise ConfigError(f"--{name} must be a number, got {text!r}") from None
        if value < 0:
            raise ConfigError(f"--{name} must be zero or more, got {text!r}")
        return value
    return parse


_CHOICES: dict[str, Callable[[str], Any]] = {
    "change": _choice("change", ("behaviour", "knowledge"), {"behavior": "behaviour"}),
    "stability": _choice("stability", ("stable", "volatile")),
    "goal": _choice("goal", ("imitate", "prefer", "verifiable")),
    "examples": _non_negative("examples", int),
    "vram": _non_negative("vram", float),
    "model": load_arch,  # an answer naming no model is re-asked, like any other bad answer
}

# flag -> the question asked when it is missing and stdin is a terminal
QUESTIONS: dict[str, str] = {
    "change": "What must change: the model's behaviour (format, style, skills) or its knowledge (facts)? "
              "[behaviour/knowledge]",
    "stability": "Is that stable, or volatile (changes every few weeks or faster)? [stable/volatile]",
    "goal": "What does your data show: demonstrations to imitate, pairs of a preferred and a rejected answer, "
            "or answers a program can verify? [imitate/prefer/verifiable]",
    "examples": "How many training examples (or pairs, or prompts) do you have?",
    "vram": "How much GPU memory do you have, in GB?",
    "model": "Which model: a preset (e.g. llama-3.1-8b), a config.json or a model folder?",
}
APPROACH_FLAGS = ("change", "stability")
METHOD_FLAGS = ("goal", "examples", "vram", "model")


def fill_missing(values: dict[str, Any], names: tuple[str, ...], ask: Callable[[str], str] | None) -> None:
    """Ask for each missing flag with ``ask`` (e.g. ``input``), or, when there is no one to ask, raise one
    ConfigError naming every missing flag."""
    missing = [n for n in names if values.get(n) is None]
    if missing and ask is None:
        raise ConfigError("plan advise needs " + ", ".join(f"--{n}" for n in missing)
                          + " (stdin is not a terminal, so it cannot ask)")
    for name in missing:
        prompt = QUESTIONS[name]
        for _ in range(3):
            try:
                answer = ask(prompt + " ")
            except EOFError:
                raise ConfigError(f"no answer for --{name}") from None
            try:
                values[name] = _CHOICES[name](answer)
                break
            except ConfigError as exc:
                prompt = f"{exc}. {QUESTIONS[name]}"
        else:
            raise ConfigError(f"no usable answer for --{name} after 3 tries")


def advise(values: dict[str, Any], *, ask: Callable[[str], str] | None = None, seq_len: int = 2048,
           batch: int = 1) -> list[Decision]:
    """Decide the approach when --change/--stability are given (or nothing else is), then the training method
    when any of --goal/--examples/--vram/--model is given, or the approach is fine-tuning and ``ask`` can ask."""
    values = dict(values)
    method_asked = any(values.get(n) is not None for n in METHOD_FLAGS)
    decisions = []
    if not method_asked or any(values.get(n) is not None for n in APPROACH_FLAGS):
        fill_missing(values, APPROACH_FLAGS, ask)
        approach = choose_approach(values["change"], values["stability"])
        decisions.append(approach)
        if approach.choice != "fine-tune" and not method_asked:
            return decisions
        if not method_asked and ask is None:
            # Not an error: the approach question was answered; the method needs answers no one is there to give.
            approach.reasons.append("Give --goal, --examples, --vram and --model to choose the training method.")
            return decisions
    fill_missing(values, METHOD_FLAGS, ask)
    arch = values["model"] if isinstance(values["model"], Arch) else load_arch(values["model"])
    decisions.append(choose_method(values["goal"], _CHOICES["examples"](values["examples"]),
                                   _CHOICES["vram"](values["vram"]), arch, seq_len=seq_len, batch=batch))
    return decisions
