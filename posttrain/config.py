"""Typed, validated run configs: YAML files plus dotted ``key=value`` overrides.

Every section forbids unknown keys; a typo is an error that lists the keys that do exist
(and the closest match), instead of a silently ignored setting.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from posttrain.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Section):
    name: str | None = Field(
        None, description="HF model folder, .gguf file, or hub id; null/'embedded' = SmolLM2-135M-Instruct"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16", "bf16_mixed"] = "auto"
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    attn_implementation: str = Field(
        "sdpa_packed", description="sdpa_packed: SDPA with a packed row's examples attended one by one (causal, no "
        "mask), else SDPA; sdpa, eager, flash_attention_2: transformers' own")
    gradient_checkpointing: bool = False
    compile: bool = Field(
        False, description="torch.compile each decoder layer (fused norms, RoPE, SwiGLU and residuals); the first "
        "steps pay for compiling (about a minute on a CPU)")
    liger: bool = Field(False, description="Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (CUDA, needs "
                        "the liger-kernel package)")
    init_adapter: str | None = Field(
        None, description="LoRA adapter (or run folder) merged into the base first, e.g. an SFT run before DPO")
    quantization: Literal["none", "nf4"] = Field(
        "none", description="nf4: the base's linear layers in 4-bit NormalFloat (QLoRA); dtype is the compute dtype")
    double_quant: bool = Field(True, description="nf4: quantize the per-block scales too (~0.37 -> ~0.13 bits/weight)")

    @model_validator(mode="after")
    def _compile_or_checkpointing(self) -> "ModelConfig":
        # A checkpointed layer with the eager attention inside it breaks the graph, and torch.compile then runs
        # the whole checkpointed layer eagerly: the switch would do nothing, silently.
        if self.compile and self.gradient_checkpointing:
            raise ValueError("model.compile has no effect on layers under model.gradient_checkpointing (they run "
                             "eagerly); set one of them to false")
        return self


class LoraConfig(_Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    # 0 by default: PEFT's dropout draws a Bernoulli mask over every LoRA input, ~30% of a CPU step here.
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' or a list of module names such as [q_proj, v_proj]"
    )


class MixConfig(_Section):
    """A general-instruction file mixed into SFT so the model keeps what it could do (against forgetting)."""
    path: str = Field(..., description="any SFT-format file (messages, alpaca, prompt/completion)")
    ratio: float = Field(0.1, gt=0.0, lt=1.0, description="share of the training examples taken from this file")
    seed: int = 0


class ReplayConfig(_Section):
    """A replay buffer: the base model's own answers to general prompts, generated before training, trained on."""
    prompts: str = Field(..., description="a file of prompts: any SFT-format file (its answers are ignored)")
    ratio: float = Field(0.1, gt=0.0, lt=1.0, description="share of the training examples that are replayed")
    max_new_tokens: int = Field(128, gt=0)
    seed: int = 0


class DataConfig(_Section):
    train: str = Field(..., description="JSONL, JSON, Parquet or CSV file")
    eval: str | None = Field(None, description="held-out file; when null, eval_fraction of train is held out")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    split_seed: int = 0
    format: Literal["auto", "messages", "alpaca", "prompt_completion"] = "auto"
    system_prompt: str | None = Field(None, description="added to rows that have no system message")
    chat_template: str | None = Field(
        None, description="Jinja chat template (text or a .jinja file) replacing the tokenizer's own")
    max_seq_len: int = Field(1024, gt=1)
    overlong: Literal["error", "truncate", "drop"] = Field(
        "error", description="what to do with an example longer than max_seq_len"
    )
    packing: bool = True
    mix: MixConfig | None = None
    replay: ReplayConfig | None = None


class TrainConfig(_Section):
    lr: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    micro_batch_size: int = Field(4, gt=0, description="sequences (or packed rows) per forward")
    grad_accum: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine decays to this fraction of lr")
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, description="null disables clipping")
    seed: int = 0
    log_every: int = Field(1, gt=0)
    eval_every: int | None = Field(None, gt=0, description="steps between held-out evals; null = at the end only")
    save_every: int | None = Field(None, gt=0, description="steps between checkpoints; null = at the end only")
    save_total_limit: int = Field(2, gt=0)
    loss_chunk_size: int = Field(1024, gt=0, description="trained positions per LM-head chunk")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun: ddp keeps a whole model per process (gradients all-reduced), fsdp "
        "shards the decoder layers' weights, gradients and optimizer state with FSDP2")
    optimizer: Literal["auto", "adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "auto", description="auto: paged 8-bit AdamW for a 4-bit base on a GPU, else AdamW (fp32 moments)")


class _Job(_Section):
    """What every training job has: its method, run folder, and the model it trains (LoRA or full)."""
    method: str
    output_dir: str
    finetune: Literal["lora", "full"] = "lora"
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()

    @model_validator(mode="after")
    def _check_quantization(self) -> "_Job":
        if self.model.quantization == "none":
            return self
        if self.finetune != "lora":
            raise ValueError(f"model.quantization: {self.model.quantization} needs finetune: lora (4-bit weights "
                             "are frozen; QLoRA trains adapters on top of them)")
        if self.model.init_adapter:
            raise ValueError("model.init_adapter with model.quantization: merging an adapter into a 4-bit base "
                             "re-quantizes it and loses most of the update; run `posttrain merge ADAPTER --out DIR` "
                             "and set model.name: DIR instead")
        return self


class SFTConfig(_Job):
    method: Literal["sft"] = "sft"
    output_dir: str = "runs/sft"
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval_samples: int = Field(3, ge=0, description="held-out prompts to generate from at eval time")
    kl_to_base: float = Field(0.0, ge=0.0, description="weight of KL(model || adapter-off base) per trained token, "
                              "against forgetting (LoRA only: the base is the same weights with adapters off)")

    @model_validator(mode="after")
    def _check(self) -> "SFTConfig":
        if self.kl_to_base and self.finetune != "lora":
            raise ValueError("kl_to_base needs finetune: lora (the base is the model with its adapters switched off; "
                             "full fine-tuning would need a second copy of the weights)")
        if self.data.mix and self.data.replay and self.data.mix.ratio + self.data.replay.ratio >= 1.0:
            raise ValueError("data.mix.ratio + data.replay.ratio must stay below 1 (they are shares of the training set)")
        if self.data.eval is None and self.data.eval_fraction == 0.0 and self.train.eval_every:
            raise ValueError("train.eval_every is set but there is no held-out data (data.eval / data.eval_fraction)")
        return self


class PreferenceDataConfig(_Section):
    train: str = Field(..., description="pairs: prompt/chosen/rejected, or HH-style chosen/rejected conversations")
    eval: str | None = Field(None, description="held-out pairs; when null, eval_fraction of train is held out")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = 0
    limit: int | None = Field(None, gt=0, description="read only the first N rows of train (and of eval)")
    system_prompt: str | None = None
    chat_template: str | None = None
    max_seq_len: int = Field(1024, gt=1, description="per response sequence (prompt + one response)")
    overlong: Literal["error", "truncate", "drop"] = "error"
    bad_pairs: Literal["error", "drop"] = Field(
        "error", description="identical or empty responses, no common prompt: stop, or count and skip")
    packing: bool = True
    share_prompt: bool = Field(
        True, description="the prompt goes through the model once per pair, chosen and rejected both attend to it")


class DPOSection(_Section):
    loss: Literal["dpo", "ipo", "simpo", "rpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    gamma: float = Field(0.5, description="SimPO target margin")
    rpo_alpha: float = Field(1.0, ge=0.0, description="RPO: weight of the chosen responses' per-token NLL")
    precompute_ref: bool = Field(False, description="one reference pass stored on disk; none during training")


def _check_share_prompt(cfg: Any) -> Any:
    if cfg.data.share_prompt and cfg.model.attn_implementation.startswith("flash"):
        raise ValueError("data.share_prompt needs an attention that takes a custom mask (sdpa, eager); with "
                         f"model.attn_implementation={cfg.model.attn_implementation!r} set data.share_prompt: false")
    return cfg


class DPOConfig(_Job):
    method: Literal["dpo"] = "dpo"
    output_dir: str = "runs/dpo"
    data: PreferenceDataConfig
    train: TrainConfig = TrainConfig(lr=5e-6, micro_batch_size=2)
    dpo: DPOSection = DPOSection()

    _share = model_validator(mode="after")(_check_share_prompt)


class RewardSection(_Section):
    margin: float = Field(0.0, description="Bradley-Terry margin: the score gap a pair should have")
    length_coef: float = Field(
        0.0, description="weight of a fixed length term (per 100 tokens) in the BT logit, to counter length bias")
    length_warn: float = Field(0.5, ge=0.0, le=1.0, description="warn when |corr(score, length)| exceeds this")


class RewardConfig(_Job):
    method: Literal["reward"] = "reward"
    output_dir: str = "runs/reward"
    data: PreferenceDataConfig
    train: TrainConfig = TrainConfig(lr=1e-4, micro_batch_size=2)
    reward: RewardSection = RewardSection()

    _share = model_validator(mode="after")(_check_share_prompt)


class PromptDataConfig(_Section):
    train: str = Field(..., description="rows with a prompt (text or chat messages) and any columns rewards read")
    eval: str | None = Field(None, description="held-out prompts; when null, eval_fraction of train is held out")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    eval_limit: int | None = Field(64, gt=0, description="held-out prompts generated from at each eval")
    split_seed: int = 0
    limit: int | None = Field(None, gt=0, description="read only the first N rows of train")
    prompt_field: str = Field("prompt", description="the column holding the prompt, e.g. 'question' for GSM8K")
    system_prompt: str | None = None
    chat_template: str | None = None
    max_prompt_len: int = Field(512, gt=1)
    overlong: Literal["error", "drop"] = "error"
    share_prompt: bool = Field(
        True, description="in training forwards a prompt goes through the model once for all its completions")


class GRPOSection(_Section):
    group_size: int = Field(4, ge=2, description="completions per prompt (G)")
    prompts_per_step: int = Field(4, gt=0)
    max_new_tokens: int = Field(128, gt=0)
    min_new_tokens: int = Field(0, ge=0, description="end of turn is not sampled before this many tokens "
                                "(benchmarks set it to max_new_tokens so every framework generates the same)")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    clip_eps: float = Field(0.2, gt=0, lt=1)
    kl_coef: float = Field(0.04, ge=0.0, description="weight of k3 KL to the reference; 0 runs no reference")
    mu: int = Field(1, gt=0, description="optimizer steps per batch of rollouts (old log-probs kept)")
    aggregation: Literal["grpo", "dapo", "dr_grpo"] = Field(
        "grpo", description="per-completion token mean (grpo), batch token mean (dapo), sum / max_new_tokens")


class RewardTerm(_Section):
    name: str = Field(..., description="gsm8k_answer, regex, json_schema, length_penalty, or package.module:fn")
    weight: float = 1.0
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the function")


def _check_mu(cfg: Any, mu: int) -> None:
    if mu > 1 and ((cfg.train.save_every or mu) % mu or (cfg.train.max_steps or mu) % mu):
        raise ValueError(f"with mu={mu} optimizer steps per rollout, train.save_every and train.max_steps must be "
                         "multiples of it (a checkpoint inside a rollout batch could not be resumed exactly)")


WATCH_HELP = ("rewards scored on every rollout and eval but never trained on (a held-out verifier or a second "
              "reward model), logged as watch/* and plotted next to the trained reward: the over-optimisation watch")


class GRPOConfig(_Job):
    method: Literal["grpo"] = "grpo"
    output_dir: str = "runs/grpo"
    data: PromptDataConfig
    train: TrainConfig = TrainConfig(lr=2e-5, micro_batch_size=8)
    grpo: GRPOSection = GRPOSection()
    rewards: list[RewardTerm] = Field(..., min_length=1)
    reward_reduce: Literal["sum", "min"] = "sum"
    watch: list[RewardTerm] = Field(default_factory=list, description=WATCH_HELP)

    _share = model_validator(mode="after")(_check_share_prompt)

    @model_validator(mode="after")
    def _check(self) -> "GRPOConfig":
        _check_mu(self, self.grpo.mu)
        return self


class PPOSection(_Section):
    reward_model: str = Field(..., description="a `posttrain reward` run folder trained from the same base "
                              "(model.name and model.init_adapter): its adapter joins the policy's base")
    samples_per_prompt: int = Field(1, ge=1)
    prompts_per_step: int = Field(8, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    kl_coef: float = Field(0.05, ge=0.0, description="per-token KL penalty folded into the reward")
    gamma: float = Field(1.0, gt=0, le=1.0)
    lam: float = Field(0.95, ge=0, le=1.0, description="GAE lambda")
    clip_eps: float = Field(0.2, gt=0, lt=1)
    value_clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0.0, description="weight of the critic's value loss in the summed loss")
    whiten_advantages: bool = True
    missing_eos_penalty: float = Field(0.0, ge=0.0, description="subtracted from the score of a completion cut "
                                       "at max_new_tokens (a reward model reads a truncated answer poorly)")
    critic_init: Literal["reward", "fresh"] = Field(
        "reward", description="start the critic from the reward model's adapter and head, or a fresh adapter")
    mu: int = Field(1, gt=0, description="optimizer steps per batch of rollouts (PPO epochs)")


class PPOConfig(_Job):
    method: Literal["ppo"] = "ppo"
    output_dir: str = "runs/ppo"
    data: PromptDataConfig
    train: TrainConfig = TrainConfig(lr=1e-5, micro_batch_size=8)
    ppo: PPOSection
    watch: list[RewardTerm] = Field(default_factory=list, description=WATCH_HELP)

    _share = model_validator(mode="after")(_check_share_prompt)

    @model_validator(mode="after")
    def _check(self) -> "PPOConfig":
        if self.finetune != "lora":
            raise ValueError("ppo needs finetune: lora: actor, critic, reward model and reference share one frozen "
                             "base as adapters (full fine-tuning would hold four copies of the model)")
        _check_mu(self, self.ppo.mu)
        return self


CONFIGS: dict[str, type[BaseModel]] = {"sft": SFTConfig, "dpo": DPOConfig, "reward": RewardConfig,
                                       "grpo": GRPOConfig, "ppo": PPOConfig}


class SuiteSpec(_Section):
    """One evaluation suite of a workflow (see posttrain/eval/suites.py for the kinds and their metrics)."""
    kind: Literal["loss", "generation", "preference", "multiple_choice", "abstention", "judge", "lm_eval"]
    data: str = Field(..., description="the suite's file; ${eval_set} is the workflow's held-out set")
    limit: int | None = Field(None, gt=0, description="only the first N rows")
    options: dict[str, Any] = Field(default_factory=dict, description="kind-specific, e.g. {scorer: json_exact}")
    judge_model: str | None = Field(None, description="kind judge: the judging model (null: the workflow's base)")


class EvalSetSpec(_Section):
    """The held-out set, fixed (and hashed) before anything trains: a file, or a split of a data file."""
    file: str | None = Field(None, description="an existing held-out file")
    split: str | None = Field(None, description="a data file to split into ${train_set} and ${eval_set}")
    fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 0
    check_contamination: bool = Field(True, description="fail when a held-out row's 8-grams are >= 50% in ${train_set}")

    @model_validator(mode="after")
    def _one(self) -> "EvalSetSpec":
        if (self.file is None) == (self.split is None):
            raise ValueError("eval_set needs exactly one of file or split")
        return self


class GateRule(_Section):
    metric: str = Field(..., description="suite/metric, e.g. in_domain/exact or ood/loss")
    min_lift: float | None = Field(None, description="improvement over the baseline must be at least this")
    min_relative_lift: float | None = Field(None, description="improvement >= this x |baseline| (0.05 = 5%)")
    max_regression: float | None = Field(None, ge=0.0, description="a worsening of at most this")

    @model_validator(mode="after")
    def _some(self) -> "GateRule":
        if self.min_lift is None and self.min_relative_lift is None and self.max_regression is None:
            raise ValueError(f"gate rule on {self.metric!r} sets no threshold: give min_lift, min_relative_lift or "
                             "max_regression")
        return self


class GateSpec(_Section):
    candidate: str = Field(..., description="a train stage's name")
    baseline: str = Field("baseline", description="'baseline' (base + system prompt) or an earlier train stage")
    rules: list[GateRule] = Field(..., min_length=1)


class StageSpec(_Section):
    """A train stage (train + config), a gate, or an export; exactly one of the three."""
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    train: Literal["sft", "dpo", "reward", "grpo", "ppo"] | None = None
    config: str | dict[str, Any] | None = Field(None, description="a job config file or an inline mapping")
    overrides: list[str] = Field(default_factory=list, description="key=value, as on the command line")
    init_from: str | None = Field(None, description="an earlier train stage whose adapter this stage starts from")
    evaluate: bool = Field(True, description="run the workflow's eval suites on the result")
    gate: GateSpec | None = None
    export: str | None = Field(None, description="a train stage whose adapter is exported (PEFT format, checked)")

    @model_validator(mode="after")
    def _one(self) -> "StageSpec":
        kinds = [k for k in ("train", "gate", "export") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"stage {self.name!r} needs exactly one of train, gate, export (got {kinds or 'none'})")
        if self.train is None and (self.config is not None or self.overrides or self.init_from):
            raise ValueError(f"stage {self.name!r}: config, overrides and init_from belong to train stages")
        return self


class BaselineSpec(_Section):
    system_prompt: str | None = Field(None, description="the prompt-only baseline: the base model with this prompt")


class WorkflowConfig(_Section):
    """eval set -> baseline -> train stages and gates -> export; each stage cached by the hash of its inputs."""
    name: str = "workflow"
    output_dir: str = "workflow-run"
    model: str | None = Field(None, description="the base model of every stage (null: the embedded SmolLM2)")
    eval_set: EvalSetSpec
    baseline: BaselineSpec = BaselineSpec()
    evals: dict[str, SuiteSpec] = Field(..., min_length=1)
    stages: list[StageSpec] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _refs(self) -> "WorkflowConfig":
        seen: dict[str, str] = {}
        for st in self.stages:
            if st.name in seen or st.name in ("baseline", "eval_set", "evals", "data"):
                raise ValueError(f"stage name {st.name!r} is used twice or reserved")
            refs = [st.init_from, st.export] + ([st.gate.candidate, st.gate.baseline] if st.gate else [])
            for ref in refs:
                if ref is not None and ref != "baseline" and seen.get(ref) != "train":
                    raise ValueError(f"stage {st.name!r} refers to {ref!r}, which is not an earlier train stage")
            seen[st.name] = "train" if st.train else "other"
        return self


def load_workflow(path: str | Path, overrides: list[str] | None = None) -> WorkflowConfig:
    """A workflow YAML file (plus ``key=value`` overrides of its top-level fields), validated."""
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read workflow {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"workflow {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"workflow {path} must be a mapping, got {type(tree).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return WorkflowConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, WorkflowConfig, str(path))) from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        # YAML parsing turns "1e-4" into a float, "null" into None, "[q_proj,v_proj]" into a list.
        value = yaml.safe_load(raw) if raw != "" else ""
        pairs.append((key.strip(), value))
    return pairs


def _fields_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    node: Any = schema
    for part in loc[:-1]:
        field = node.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        node = ann
    return sorted(node.model_fields)


def _explain(exc: ValidationError, schema: type[BaseModel], source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _fields_at(schema, loc) or []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            lines.append(f"  {where}: unknown key.{hint} Keys here: {', '.join(known)}")
        elif err["type"] == "missing":
            lines.append(f"  {where}: required, but not given")
        else:
            lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, method: str | None = None,
                base: dict[str, Any] | None = None) -> Any:
    """Read a YAML config, apply ``key=value`` overrides, and validate it.

    ``method`` picks the schema when the file does not name one; ``base`` is a dict used instead of a file.
    """
    source = str(path) if path is not None else "(overrides)"
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of sections, got {type(loaded).__name__}")
        tree.update(loaded)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    name = tree.get("method", method or "sft")
    schema = CONFIGS.get(name)
    if schema is None:
        raise ConfigError(f"config {source}: unknown method {name!r}; known: {', '.join(CONFIGS)}")
    try:
        return schema.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, schema, source)) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
