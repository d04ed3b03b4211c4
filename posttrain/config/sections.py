"""The sections of a job config: model, LoRA, data (SFT, preference, prompt, labelled steps) and training schedule.

Layer 1 (config): imports only pydantic and the stdlib. ``Section`` is the base of every schema here and in
``jobs``/``workflow``: unknown keys are an error, never a silently ignored setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(Section):
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


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    # 0 by default: PEFT's dropout draws a Bernoulli mask over every LoRA input, ~30% of a CPU step here.
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' or a list of module names such as [q_proj, v_proj]"
    )


class CardConfig(Section):
    """What the model card (README.md of `posttrain merge` / `export` folders) cannot read from the run itself."""
    intended_use: str | None = Field(None, description="who should use the model, for what, and what not for")
    license: str | None = Field(None, description="the card's license: front matter, e.g. apache-2.0")
    datasets: list[str] = Field(default_factory=list, description="hub dataset ids the data came from, if any")


class MixConfig(Section):
    """A general-instruction file mixed into SFT so the model keeps what it could do (against forgetting)."""
    path: str = Field(..., description="any SFT-format file (messages, alpaca, prompt/completion)")
    ratio: float = Field(0.1, gt=0.0, lt=1.0, description="share of the training examples taken from this file")
    seed: int = 0


class ReplayConfig(Section):
    """A replay buffer: the base model's own answers to general prompts, generated before training, trained on."""
    prompts: str = Field(..., description="a file of prompts: any SFT-format file (its answers are ignored)")
    ratio: float = Field(0.1, gt=0.0, lt=1.0, description="share of the training examples that are replayed")
    max_new_tokens: int = Field(128, gt=0)
    seed: int = 0


class DataConfig(Section):
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
    rewritten_turns: Literal["error", "mask"] = Field(
        "error", description="an assistant turn the chat template changes (Qwen3's drops earlier <think> blocks): "
        "stop, or keep it as context out of the loss (counted in the data report)")
    packing: bool = True
    mix: MixConfig | None = None
    replay: ReplayConfig | None = None


class TrainConfig(Section):
    lr: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    max_minutes: float | None = Field(
        None, gt=0, description="a wall-clock budget: the run ends after the first step that finishes past it (evals "
        "included), with its final eval and checkpoint; lr still follows the schedule of the full length, so runs "
        "compared on one budget want a constant lr (warmup_ratio 0, min_lr_ratio 1)")
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
    # Here, not on the job: it is a setting of the loop (where its records go), reaches it through LoopOptions as
    # every train.* key does, and a workflow stage overrides it as train.report_to like any other.
    report_to: Literal["auto"] | list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(
        "auto", description="experiment trackers that get metrics.jsonl's records, the config and the final evals "
        "(rank 0 only): a list of tensorboard, mlflow, wandb, trackio; [] for none; auto: tensorboard when its "
        "package is installed. A named tracker whose package is missing stops the run before the model loads")
    tracker_project: str = Field(
        "posttrain", min_length=1, description="the MLflow experiment, W&B project or Trackio project")
    run_name: str | None = Field(None, description="the run's name in the trackers; null: the run folder's name")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value: object) -> object:
        return [value] if isinstance(value, str) and value != "auto" else value  # report_to: wandb, as one name



class PreferenceDataConfig(Section):
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


class UnpairedDataConfig(Section):
    """KTO's rows: a prompt, one completion and a boolean label (``data.unpaired``)."""
    train: str = Field(..., description="rows of prompt / completion / label (true: desirable), e.g. from "
                       "`posttrain data unpair`")
    eval: str | None = Field(None, description="held-out rows; when null, eval_fraction of train's prompts is held "
                             "out (every row of a held-out prompt, so both sides of an unpaired pair stay together)")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = 0
    limit: int | None = Field(None, gt=0, description="read only the first N rows of train (and of eval)")
    system_prompt: str | None = None
    chat_template: str | None = None
    max_seq_len: int = Field(1024, gt=1, description="per row (prompt + completion); a mismatched sequence of "
                             "KTO's reference point is cut to it too")
    overlong: Literal["error", "truncate", "drop"] = "error"


class PromptDataConfig(Section):
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


class StepDataConfig(Section):
    """Process-reward rows: a prompt, its solution's steps and one label per step (``data.steps``)."""
    train: str = Field(..., description="rows of prompt / steps / labels, e.g. from `posttrain data prm-labels`")
    eval: str | None = Field(None, description="held-out rows; when null, eval_fraction of train is held out")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = 0
    eval_limit: int | None = Field(None, gt=0, description="held-out rows scored at each eval (null: all)")
    limit: int | None = Field(None, gt=0, description="read only the first N rows of train (and of eval)")
    system_prompt: str | None = None
    chat_template: str | None = None
    max_seq_len: int = Field(1024, gt=1, description="tokens of prompt + steps, up to the last step's end")
    overlong: Literal["error", "truncate", "drop"] = Field(
        "error", description="a longer row: stop; keep the steps that fit (the cut ones counted in the data "
        "report); or drop the row (counted)")
    packing: bool = True
