"""Builders shared by the tests: tiny models, adapters and rows. Fixtures live in conftest.py; no test module
imports another test module."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


def make_tiny(path: Path, tokenizer, *, layers: int = 2, hidden: int = 64, seed: int = 0,
              end_logit: float | None = None) -> str:
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as an HF folder. ``end_logit``: a model that ends
    its turns, for multi-turn tests: a large bias on the last MLP's output points every final hidden state along one
    unit direction u (so after the final norm h ~ sqrt(hidden) u), and the EOS row of the tied embedding is
    u * end_logit / sqrt(hidden), so EOS's logit is ~end_logit at every position while the others stay near 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True, mlp_bias=end_logit is not None,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    if end_logit is not None:
        u = torch.nn.functional.normalize(torch.randn(hidden), dim=0)
        with torch.no_grad():
            for layer in model.model.layers:
                for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                    lin.bias.zero_()
            model.model.layers[-1].mlp.down_proj.bias.copy_(100.0 * u)
            model.model.embed_tokens.weight[tokenizer.eos_token_id] = u * end_logit / hidden ** 0.5
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def small_tokenizer(tokenizer, path: Path, size: int = 1024):
    """The SmolLM2 tokenizer cut to its first ``size`` ids: the same special tokens, byte alphabet and chat
    template, only the merges that build a kept token. Byte-level BPE merges in id order, so the cut is a valid
    tokenizer (rarer words split into more pieces); a GGUF of it reads back in a fraction of a second, where the
    full 49,152-token vocabulary takes ~5 s to parse."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(path)
    spec = json.loads((path / "tokenizer.json").read_text())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < size}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if "".join(m) in vocab]
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < size]
    (path / "tokenizer.json").write_text(json.dumps(spec))
    return AutoTokenizer.from_pretrained(path)


def make_adapter(base_dir: str, out: Path, *, seed: int, targets, scale: float = 0.5) -> Path:
    """A LoRA adapter whose B is random (PEFT starts B at zero, a no-op), times ``scale``, so each adapter changes
    the outputs."""
    from transformers import AutoModelForCausalLM

    from posttrain.models import apply_lora

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    peft.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
    rows = []
    for i in range(n):
        a, b = rnd.choice(words), rnd.choice(words)
        rows.append({"messages": [{"role": "user", "content": f"Combine {a} and {b} (#{i})."},
                                  {"role": "assistant", "content": f"{a}-{b}" + " ok" * rnd.randint(0, 6)}]})
    return rows


def pair_rows(n: int) -> list[dict]:
    colours = ["red", "green", "blue", "amber", "violet", "teal"]
    return [{"prompt": f"Name colour number {i}.", "chosen": f"{colours[i % 6]}.",
             "rejected": f"I refuse to name colour {i}, sorry." + " no" * (i % 3)} for i in range(n)]


def random_examples(n: int, vocab: int, seed: int = 0) -> list:
    from posttrain.data import Example

    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        length = rnd.randint(3, 20)
        ids = [rnd.randrange(vocab) for _ in range(length)]
        cut = rnd.randint(1, length - 1)
        out.append(Example(input_ids=ids, trained=[False] * cut + [True] * (length - cut)))
    return out


def step_records(run_dir: Path, keys=("step", "loss", "reward", "grad_norm")) -> list[tuple]:
    """The given fields of every optimizer-step record of a run's metrics.jsonl (resume-equals-uninterrupted)."""
    rows = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return [tuple(m[k] for k in keys) for m in rows if "loss" in m]


def prm_solution_rows(n: int) -> list[dict]:
    """Correct steps end in '.', incorrect ones in '!': a tiny model can learn the difference in a few steps."""
    rows = []
    for i in range(n):
        a, b = i % 7 + 1, i % 5 + 2
        bad = i % 3  # 0: all correct; 1: step 1 wrong; 2: step 2 wrong
        steps = [f"{a} + {b} = {a + b}.", f"{a + b} * 2 = {2 * (a + b) + (bad == 1)}" + ("!" if bad == 1 else "."),
                 f"The answer is {2 * (a + b)}" + ("!" if bad == 2 else ".")]
        labels = [True, bad != 1, None if bad == 1 else bad != 2]
        if i % 4 == 3:
            labels[0] = 0.9  # a soft label
        rows.append({"prompt": f"What is ({a} + {b}) * 2?", "steps": steps, "labels": labels, "answer": "x"})
    return rows


def tiny_prm_run(tiny_dir: str, tmp: Path, *, max_steps: int = 2) -> Path:
    """A `posttrain prm` run folder on the tiny model (a few steps on prm_solution_rows): something to load."""
    from posttrain.config import load_config
    from posttrain.recipes import RECIPES

    path = write_jsonl(tmp / "prm-labels.jsonl", prm_solution_rows(12))
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train={path}", f"output_dir={tmp / 'prm'}",
                             f"train.max_steps={max_steps}", "train.lr=5e-3", "data.eval_fraction=0.25",
                             "train.micro_batch_size=4", "data.max_seq_len=160"], method="prm")
    RECIPES["prm"].run(cfg)
    return tmp / "prm"


def rollout_case():
    """Five completions of two prompts (three share the first), random ids."""
    g = torch.Generator().manual_seed(1)
    p1 = torch.randint(5, 500, (7,), generator=g).tolist()
    p2 = torch.randint(5, 500, (4,), generator=g).tolist()
    comps = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (3, 5, 1, 4, 2)]
    return [p1, p1, p1, p2, p2], comps


def new_engine(tiny_dir: str):
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_tokenizer
    from posttrain.serve import Engine

    return Engine(AutoModelForCausalLM.from_pretrained(tiny_dir), load_tokenizer(tiny_dir), base_path=tiny_dir)


def grpo_cfg(tiny_dir: str, tmp_path: Path, out: Path, *extra: str):
    """A 4-step GRPO job on 12 number prompts with two rewards and a watch term."""
    from posttrain.config import load_config

    rows = [{"question": f"Say a number bigger than {i}.", "answer": f"#### {i + 1}"} for i in range(12)]
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    return load_config(None, [f"model.name={tiny_dir}", f"data.train={path}", f"output_dir={out}",
                              "data.prompt_field=question", "data.eval_fraction=0.2", "grpo.group_size=3",
                              "grpo.prompts_per_step=2", "grpo.max_new_tokens=8", "train.lr=1e-3",
                              "train.micro_batch_size=3", "train.max_steps=4", *extra],
                       method="grpo", base={"rewards": [{"name": "regex", "weight": 1.0, "options": {"pattern": "1"}},
                                                        {"name": "gsm8k_answer", "weight": 0.5,
                                                         "options": {"strict": False}}],
                                            "watch": [{"name": "regex", "options": {"pattern": "[0-9]"}}]})


# Settings dataclasses from their config sections, where the defaults are declared (as a run builds them).
def preference_params(**kw):
    from posttrain.config import DPOSection
    from posttrain.losses import PreferenceParams
    from posttrain.recipes._common import from_section

    return from_section(PreferenceParams, DPOSection(**kw))


def grpo_params(**kw):
    from posttrain.config import GRPOSection
    from posttrain.methods.grpo import GRPOParams
    from posttrain.recipes._common import from_section

    return from_section(GRPOParams, GRPOSection(**kw))


def ppo_params(**kw):
    from posttrain.config import PPOSection
    from posttrain.methods.ppo import PPOParams
    from posttrain.recipes._common import from_section

    return from_section(PPOParams, PPOSection(reward_model="unused", **kw))


def loop_opts(total_steps: int, **kw):
    """LoopOptions for ``total_steps`` with TrainConfig's defaults, no warm-up, AdamW, no autocast."""
    from posttrain.config import TrainConfig
    from posttrain.engine import LoopOptions
    from posttrain.recipes._common import from_section

    return from_section(LoopOptions, TrainConfig(**kw), total_steps=total_steps, warmup_steps=0, optimizer="adamw",
                        autocast=None)


def lora_policy(base_dir: str, *, seed: int, scale: float, r: int = 4):
    """A LoRA policy on ``base_dir`` whose B matrices are random (times ``scale``), so it differs from its base."""
    from transformers import AutoModelForCausalLM

    from posttrain.models import apply_lora

    model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), r=r, alpha=2 * r, dropout=0.0,
                       target_modules="all-linear")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def engine_gap(model, tokenizer, ro, temperature: float, reduce: str = "mean") -> float:
    """Mean (or max) |logp_train - logp_engine| over a rollout's completion tokens, the trainer's log-probs from a
    teacher-forced forward of ``model`` at ``temperature``."""
    from posttrain.data.collate import collate_rollouts
    from posttrain.models.forward import evaluating, token_logps

    batch = collate_rollouts(ro.prompt_ids, ro.completion_ids, tokenizer.pad_token_id)
    with evaluating(model), torch.no_grad():
        train = token_logps(model, batch, temperature)
    engine = torch.zeros_like(train)
    for i, lp in enumerate(ro.logprobs):
        engine[i, :len(lp)] = torch.tensor(lp)
    mask = batch["completion_mask"].float()
    diff = (train - engine).abs() * mask
    return float(diff.max() if reduce == "max" else diff.sum() / mask.sum())
