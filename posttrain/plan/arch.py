"""The shape of a Llama-family model, read from a Hugging Face ``config.json`` or a built-in preset.

The planner needs only the sizes below; it never loads weights, so it answers for a 70B model on a laptop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError

# Published config.json values (the fields the planner reads). Kept as config dicts, not as Arch objects,
# so a preset goes through exactly the same parsing and checks as a user's file.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                 "tie_word_embeddings": False},
    "llama-2-13b": {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                    "tie_word_embeddings": False},
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": False},
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "tie_word_embeddings": True},
    "llama-3-70b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                    "tie_word_embeddings": False},
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                     "tie_word_embeddings": True},
}
PRESETS["llama-2-7b"] = PRESETS["llama-7b"]  # the same shapes as LLaMA-1 7B

# Model types whose decoder block is the Llama block (q/k/v/o, gate/up/down, two RMSNorms, no biases).
LLAMA_LIKE = ("llama", "mistral")

_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class Arch:
    """Sizes of a Llama-family decoder. ``head_dim`` is per attention head; K and V use ``num_kv_heads`` heads."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each linear module in one decoder layer, in PEFT's module names."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def arch_from_config(cfg: dict[str, Any], *, name: str, source: str) -> Arch:
    """Build an Arch from config.json contents; ``source`` names the file (or preset) in error messages."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object of model settings, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type is not None and model_type not in LLAMA_LIKE:
        raise ConfigError(f"{source}: model_type {model_type!r} is not a Llama-family model; the planner counts "
                          f"Llama-style blocks ({', '.join(LLAMA_LIKE)})")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ConfigError(f"{source}: {key}=true; the planner counts Llama blocks without biases")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ConfigError(f"{source}: missing field {missing[0]!r} (a Llama config.json needs {', '.join(_REQUIRED)}"
                          f"; missing: {', '.join(missing)})")

    def positive_int(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{source}: field {key!r} must be a positive integer, got {value!r}")
        return value

    heads = positive_int("num_attention_heads", cfg["num_attention_heads"])
    hidden = positive_int("hidden_size", cfg["hidden_size"])
    # HF semantics: a missing num_key_value_heads means multi-head attention, a missing (or null) head_dim
    # means hidden_size / heads.
    kv_heads = positive_int("num_key_value_heads", cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ConfigError(f"{source}: hidden_size={hidden} is not divisible by num_attention_heads={heads}; "
                              "set head_dim")
        head_dim = hidden // heads
    tie = cfg.get("tie_word_embeddings", False)  # LlamaConfig's default
    if not isinstance(tie, bool):
        raise ConfigError(f"{source}: field 'tie_word_embeddings' must be true or false, got {tie!r}")
    return Arch(name=name, hidden_size=hidden,
                intermediate_size=positive_int("intermediate_size", cfg["intermediate_size"]),
                num_layers=positive_int("num_hidden_layers", cfg["num_hidden_layers"]),
                num_heads=heads, num_kv_heads=kv_heads, head_dim=positive_int("head_dim", head_dim),
                vocab_size=positive_int("vocab_size", cfg["vocab_size"]), tie_word_embeddings=tie)


def load_arch(model: str | Path) -> Arch:
    """A config.json file, a model folder holding one, or a preset name (see ``PRESETS``)."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{model}: folder has no config.json")
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
        return arch_from_config(cfg, name=name, source=str(path))
    key = str(model).lower()
    if key in PRESETS:
        return arch_from_config(PRESETS[key], name=key, source=f"preset {key}")
    raise ConfigError(f"unknown model {str(model)!r}: not a config.json, a model folder or a preset "
                      f"(presets: {', '.join(PRESETS)})")
