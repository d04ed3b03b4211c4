"""GPU memory needed to fine-tune a Llama-family model with full fine-tuning, LoRA or QLoRA.

All sizes are bytes; reports use GB = 1e9 bytes. The budget is
weights + adapters + gradients + optimizer state + activations (+ a frozen reference copy for full-parameter
preference/RL training), then slack (``SLACK_PERCENT`` of that subtotal, for allocator fragmentation and
transient buffers) and a fixed ``CUDA_CONTEXT_BYTES``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from posttrain.errors import ConfigError
from posttrain.plan.arch import Arch
from posttrain.plan.params import ParamCount, Trainable, count_params, trainable_params

GB = 10**9
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Optimizer state per trainable parameter: AdamW keeps fp32 m and v (4 + 4 bytes); the bitsandbytes 8-bit
# variants keep both in 8 bits (block-wise scales are negligible); plain SGD without momentum keeps none.
OPTIMIZER_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2, "sgd": 0}
# QLoRA's usual recipe (the bitsandbytes/PEFT QLoRA guides) pairs 4-bit weights with a paged 8-bit AdamW;
# full and LoRA runs default to posttrain's own optimizer, torch AdamW.
DEFAULT_OPTIMIZER = {"full": "adamw", "lora": "adamw", "qlora": "paged_adamw_8bit"}
SLACK_PERCENT = 10
CUDA_CONTEXT_BYTES = 1 * GB
# posttrain's chunked cross-entropy materialises at most this many rows of logits (train.loss_chunk_size).
LOSS_CHUNK_TOKENS = 1024
# Marketed memory sizes. Treated as GB here; the cards report slightly more (the labels are closer to GiB),
# which the planner leaves as headroom rather than counting on it.
GPU_SIZES_GB: dict[str, int] = {"16 GB": 16, "24 GB": 24, "40 GB": 40, "48 GB": 48, "80 GB": 80,
                                "94 GB (H100 NVL)": 94, "141 GB (H200)": 141}


def nf4_bytes(num_params: int) -> int:
    """Bytes of one weight matrix in bitsandbytes NF4 with double quantization (Dettmers et al. 2023, QLoRA §3):
    4 bits per weight, one 8-bit absmax per block of 64 weights, one fp32 scale per 256 absmax blocks:
    4 + 8/64 + 32/(64*256) = 4.127 bits per weight when the sizes divide evenly."""
    blocks = math.ceil(num_params / 64)
    return math.ceil(num_params / 2) + blocks + 4 * math.ceil(blocks / 256)


def activation_elements_per_token_layer(arch: Arch) -> int:
    """Activation values one Llama decoder layer keeps for backward, per token.

    Method: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", §4.1,
    count each tensor saved for backward. For a GPT block in 16-bit they get s*b*h*(34 + 5*a*s/h) bytes per
    layer. The same count for a Llama block, with flash attention (which keeps Q, K, V, the output and a
    per-head log-sum-exp instead of the a*s^2 score and softmax tensors, so the 5*a*s/h term goes away) and no
    dropout (Llama trains without it, so no masks):
      attention: RMSNorm input h, q/k/v input h, Q q_dim, K and V 2*kv_dim, attention output q_dim
      MLP:       RMSNorm input h, gate/up input h, gate output i, up output i, SiLU output i, down input i
    = 4h + 2*q_dim + 2*kv_dim + 4i values. Llama-7B: 8*4096 + 4*11008 = 76,800 values = 37.5*h bytes in 16-bit,
    near Korthikanti's 34*h for a GPT block of the same width. It counts frozen linears' inputs too: those are
    needed when LoRA adapts all linear modules, and an upper bound otherwise. LoRA's r-wide intermediates
    (under 1% here) are not counted.
    """
    h, i = arch.hidden_size, arch.intermediate_size
    return 4 * h + 2 * arch.q_dim + 2 * arch.kv_dim + 4 * i


def activation_bytes(arch: Arch, *, seq_len: int, batch: int, checkpointing: bool, dtype_bytes: int) -> int:
    """Activations of one micro-batch at their peak in backward, in bytes.

    Without checkpointing every layer keeps its full set (``activation_elements_per_token_layer``). With
    checkpointing (one checkpoint per decoder layer, as transformers does) each layer keeps only its input
    (h values per token) and one layer's full set exists at a time while it is recomputed. Both add the loss:
    posttrain's chunked cross-entropy holds one chunk of at most ``LOSS_CHUNK_TOKENS`` rows of fp32 logits and
    its gradient in the training dtype.
    """
    tokens = seq_len * batch
    per_layer = activation_elements_per_token_layer(arch) * tokens * dtype_bytes
    if checkpointing:
        layers = arch.num_layers * arch.hidden_size * tokens * dtype_bytes + per_layer
    else:
        layers = arch.num_layers * per_layer
    logits = min(tokens, LOSS_CHUNK_TOKENS) * arch.vocab_size * (4 + dtype_bytes)
    return layers + logits


@dataclass(frozen=True)
class MemoryPlan:
    """A memory budget in bytes; ``total`` is what a GPU must hold."""

    arch: Arch
    params: ParamCount
    trainable: Trainable
    dtype: str
    optimizer: str
    seq_len: int
    batch: int
    checkpointing: bool
    weights: int
    adapters: int
    gradients: int
    optimizer_state: int
    activations: int
    activations_other: int  # the activations with checkpointing toggled, for the note under the table
    reference: int = 0
    assumptions: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.trainable.method

    @property
    def subtotal(self) -> int:
        return (self.weights + self.adapters + self.gradients + self.optimizer_state + self.activations
                + self.reference)

    @property
    def slack(self) -> int:
        return self.subtotal * SLACK_PERCENT // 100  # integers, so tests can check the bytes exactly

    @property
    def cuda_context(self) -> int:
        return CUDA_CONTEXT_BYTES

    @property
    def total(self) -> int:
        return self.subtotal + self.slack + self.cuda_context

    def rows(self) -> list[tuple[str, int]]:
        """(component, bytes) in the order the table shows them."""
        rows = [("weights", self.weights), ("adapters", self.adapters), ("gradients", self.gradients),
                ("optimizer state", self.optimizer_state), ("activations", self.activations)]
        if self.reference:
            rows.append(("reference model", self.reference))
        return [*rows, (f"slack ({SLACK_PERCENT}%)", self.slack), ("CUDA context", self.cuda_context)]

    def fit(self, gpu_gb: float) -> str:
        """``fits``; ``marginal`` when it fits only if the slack is not needed; else ``no``."""
        capacity = gpu_gb * GB
        if self.total <= capacity:
            return "fits"
        if self.subtotal + self.cuda_context <= capacity:
            return "marginal"
        return "no"

    def fits(self) -> dict[str, str]:
        return {label: self.fit(size) for label, size in GPU_SIZES_GB.items()}

    def to_dict(self) -> dict:
        return {"model": self.arch.name, "method": self.method, "dtype": self.dtype, "optimizer": self.optimizer,
                "seq_len": self.seq_len, "batch": self.batch, "checkpointing": self.checkpointing,
                "params_total": self.params.total, "trainable": self.trainable.total,
                "trainable_percent": self.trainable.percent, "lora_r": self.trainable.r,
                "lora_targets": list(self.trainable.targets), "trainable_per_module": self.trainable.per_module,
                "bytes": {name: value for name, value in self.rows()} | {"subtotal": self.subtotal,
                                                                        "total": self.total},
                "total_gb": self.total / GB, "gpus": self.fits(), "assumptions": self.assumptions}


def plan_memory(arch: Arch, method: str = "lora", *, r: int = 16,
                targets: str | Sequence[str] = ("q_proj", "v_proj"), dtype: str = "bf16",
                optimizer: str | None = None, seq_len: int = 2048, batch: int = 1, checkpointing: bool = True,
                reference_model: bool = False) -> MemoryPlan:
    """The memory budget of one training step. ``optimizer=None`` takes ``DEFAULT_OPTIMIZER[method]``.

    ``reference_model`` adds a frozen copy of the weights, as DPO or GRPO with a KL term need for full
    fine-tuning; with LoRA the reference is the base with the adapters switched off, which costs nothing.
    """
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    trainable = trainable_params(arch, method, r=r, targets=targets)
    optimizer = optimizer or DEFAULT_OPTIMIZER[method]
    if optimizer not in OPTIMIZER_BYTES:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZER_BYTES)}")
    for name, value in (("seq_len", seq_len), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    params = count_params(arch)
    nbytes = DTYPE_BYTES[dtype]
    weight_words = "the weights not quantized" if method == "qlora" else "weights"
    notes = [f"1 GB = 1e9 bytes; {dtype} ({nbytes} bytes) for {weight_words}, adapters, gradients and activations"]

    if method == "qlora":
        shapes = arch.linear_shapes()
        quantized = arch.num_layers * sum(nf4_bytes(d_in * d_out) for d_in, d_out in shapes.values())
        weights = quantized + params.kept_16bit * nbytes
        notes.append("qlora: every linear in the decoder layers in NF4 with double quantization "
                     "(4 + 8/64 + 32/(64*256) = 4.127 bits/param); embeddings, lm_head and norms stay in "
                     f"{dtype} because bitsandbytes quantizes only those nn.Linear layers")
    else:
        weights = params.total * nbytes
    if method == "full":
        adapters = 0
        notes.append("full: no fp32 master copy of the weights (mixed precision with one adds 4 bytes/param)")
    else:
        adapters = trainable.total * nbytes
    gradients = trainable.total * nbytes
    optimizer_state = trainable.total * OPTIMIZER_BYTES[optimizer]
    notes.append(f"optimizer {optimizer}: {OPTIMIZER_BYTES[optimizer]} bytes per trainable parameter")

    def acts(ckpt: bool) -> int:
        return activation_bytes(arch, seq_len=seq_len, batch=batch, checkpointing=ckpt, dtype_bytes=nbytes)

    activations, other = acts(checkpointing), acts(not checkpointing)
    notes.append(f"activations for batch {batch} x seq {seq_len}, checkpointing {'on' if checkpointing else 'off'}"
                 f" (Korthikanti et al. 2022 count for a Llama block, flash attention); "
                 f"{'off' if checkpointing else 'on'} it would be {other / GB:.2f} GB")
    reference = params.total * nbytes if reference_model and method == "full" else 0
    notes.append(f"slack {SLACK_PERCENT}% of the subtotal (fragmentation, transient buffers) + "
                 f"{CUDA_CONTEXT_BYTES / GB:.0f} GB CUDA context; 'marginal' = fits only without the slack; "
                 "GPU sizes are their labels read as GB")
    return MemoryPlan(arch=arch, params=params, trainable=trainable, dtype=dtype, optimizer=optimizer,
                      seq_len=seq_len, batch=batch, checkpointing=checkpointing, weights=weights,
                      adapters=adapters, gradients=gradients, optimizer_state=optimizer_state,
                      activations=activations, activations_other=other, reference=reference, assumptions=notes)
