"""Parameter counts of a Llama-family model, and how many of them a fine-tuning method trains."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from posttrain.errors import ConfigError
from posttrain.plan.arch import Arch

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = ("full", "lora", "qlora")


@dataclass(frozen=True)
class ParamCount:
    """Parameters by part. ``linear_in_blocks`` is what bitsandbytes quantizes for QLoRA (every nn.Linear in
    the decoder layers); ``kept_16bit`` is the rest (embeddings, lm_head, RMSNorm weights)."""

    embedding: int
    attention_per_layer: int
    mlp_per_layer: int
    norms_per_layer: int
    final_norm: int
    lm_head: int
    num_layers: int

    @property
    def per_layer(self) -> int:
        return self.attention_per_layer + self.mlp_per_layer + self.norms_per_layer

    @property
    def linear_in_blocks(self) -> int:
        return (self.attention_per_layer + self.mlp_per_layer) * self.num_layers

    @property
    def total(self) -> int:
        return self.embedding + self.per_layer * self.num_layers + self.final_norm + self.lm_head

    @property
    def kept_16bit(self) -> int:
        return self.total - self.linear_in_blocks


def count_params(arch: Arch) -> ParamCount:
    """Embeddings, per layer q/k/v/o + gate/up/down + 2 RMSNorm weights, final norm, lm_head unless tied."""
    shapes = arch.linear_shapes()
    attention = sum(d_in * d_out for m, (d_in, d_out) in shapes.items() if m in LINEAR_MODULES[:4])
    mlp = sum(d_in * d_out for m, (d_in, d_out) in shapes.items() if m in LINEAR_MODULES[4:])
    embedding = arch.vocab_size * arch.hidden_size
    return ParamCount(embedding=embedding, attention_per_layer=attention, mlp_per_layer=mlp,
                      norms_per_layer=2 * arch.hidden_size, final_norm=arch.hidden_size,
                      lm_head=0 if arch.tie_word_embeddings else embedding, num_layers=arch.num_layers)


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """``"all-linear"``, ``"q_proj,v_proj"`` or a list of module names -> module names in a fixed order."""
    if isinstance(targets, str):
        if targets.strip() == "all-linear":
            return LINEAR_MODULES
        targets = [t for t in (s.strip() for s in targets.split(",")) if t]
    if not targets:
        raise ConfigError("LoRA targets are empty; name modules (e.g. q_proj,v_proj) or use all-linear")
    unknown = [t for t in targets if t not in LINEAR_MODULES]
    if unknown:
        raise ConfigError(f"unknown LoRA target {unknown[0]!r}; Llama linear modules are {', '.join(LINEAR_MODULES)}"
                          " (or all-linear)")
    return tuple(m for m in LINEAR_MODULES if m in targets)


@dataclass(frozen=True)
class Trainable:
    """Trainable parameters: ``per_module`` sums each adapted module over all layers."""

    method: str
    total: int
    model_total: int
    r: int | None = None
    targets: tuple[str, ...] = ()
    per_module: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        """Share of the base model's parameters (adapters are not added to the denominator)."""
        return 100.0 * self.total / self.model_total


def trainable_params(arch: Arch, method: str = "lora", *, r: int = 16,
                     targets: str | Sequence[str] = ("q_proj", "v_proj")) -> Trainable:
    """``full`` trains everything; ``lora``/``qlora`` train r*(d_in + d_out) per adapted linear per layer
    (A is r x d_in, B is d_out x r; Hu et al. 2021)."""
    model_total = count_params(arch).total
    if method == "full":
        return Trainable(method=method, total=model_total, model_total=model_total)
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"LoRA rank r must be a positive integer, got {r!r}")
    modules = parse_targets(targets)
    shapes = arch.linear_shapes()
    per_module = {m: r * (shapes[m][0] + shapes[m][1]) * arch.num_layers for m in modules}
    return Trainable(method=method, total=sum(per_module.values()), model_total=model_total, r=r,
                     targets=modules, per_module=per_module)
