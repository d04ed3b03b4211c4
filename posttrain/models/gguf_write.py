"""Write a Hugging Face Llama model and its byte-level BPE tokenizer as one GGUF file, for llama.cpp and Ollama.

The layout follows llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``: ``permute``, ``set_gguf_parameters``,
``_set_vocab_gpt2``), so the file loads in llama.cpp and in transformers' GGUF loader, which undoes the same
Q/K permutation. Weights are stored in the chosen quantization through ``gguf.quants`` (numpy); 1-D tensors
(norms) stay f32, as llama.cpp keeps them. Only what the GGUF side can carry back is written: a model with biases,
rope scaling or a non byte-level tokenizer is refused, naming what is missing, rather than exported and silently
changed. Layer 2: imports errors only.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ConfigError


@dataclass(frozen=True)
class GGUFQuant:
    """One ``--quant`` choice: the ggml type of the 2-D weights and of the token embedding (which is also the
    output head of a tied model), the file type llama.cpp records, and the tolerance the export check holds it to:
    at least ``min_greedy_identical`` (a fraction) of the check prompts' greedy continuations equal to base +
    adapter's, at least ``min_top1_agreement`` of the reference's answer tokens still the top-1 on the reference's
    own prefix (teacher-forced), and a mean |logit diff| along the reference tokens of at most
    ``max_mean_logit_diff``."""
    weights: str
    embedding: str
    file_type: str
    min_greedy_identical: float
    min_top1_agreement: float
    max_mean_logit_diff: float
    measured: str


# The quantizations gguf.quants can write in numpy. The 4/5-bit ones keep the token embedding in q8_0, as
# llama-quantize keeps the tied head above the body's precision: in 4 bits it is the largest single error source.
# Tolerances, from `benchmarks/gguf_quants.py` on the embedded SmolLM2-135M after two LoRA SFTs (r 16, all-linear):
# the full examples/sft-lora.yaml (2 epochs) and an 8-step one; 8 prompts x 32 greedy tokens, logits up to 45
# (RESULTS.md, "GGUF export"). The rule rests on teacher-forced top-1 agreement, not on whole greedy answers: one
# near-tied token that flips changes every token after it, so q8_0 kept 7/8 answers after one adapter and 3/8
# after the other with the same logit error, while its top-1 agreement moved only from 99.6% to 97.8% (every flip
# where the reference led by under 0.2 logits). Top-1: at least 1 - 2 x (the worse measured disagreement), floored
# to 0.01, at most 0.99; mean |logit diff|: at most twice the worse measured. f16 and f32 also keep every greedy
# answer (measured 8/8 after both). The base is itself a Q4_1 file: below 8 bits the export keeps little of a
# LoRA update (q4_1 rounds ~94% of a small one back onto the base's grid; q5 adds noise ~25x its size), so those
# tolerances accept what was measured, which is far from base + adapter; the top-1 floor still fails a broken
# file (written without the Q/K permutation, a tiny test model's file agrees on 23% of its tokens).
QUANTS: dict[str, GGUFQuant] = {
    "f32": GGUFQuant("F32", "F32", "ALL_F32", 1.0, 1.0, 1e-3, "exact: the same floats (tiny-model test: max < 1e-5)"),
    "f16": GGUFQuant("F16", "F16", "MOSTLY_F16", 1.0, 0.99, 0.015,
                     "top-1 100% / 100%, greedy 8/8 / 8/8, mean 0.0048 / 0.0069 (full sft-lora / 8 steps)"),
    "bf16": GGUFQuant("BF16", "BF16", "MOSTLY_BF16", 0.0, 0.99, 0.15,
                      "top-1 99.6% / 100%, greedy 7/8 / 8/8, mean 0.050 / 0.069 (full sft-lora / 8 steps)"),
    "q8_0": GGUFQuant("Q8_0", "Q8_0", "MOSTLY_Q8_0", 0.0, 0.95, 0.45,
                      "top-1 97.8% / 99.6%, greedy 3/8 / 7/8, mean 0.21 / 0.18 (full sft-lora / 8 steps)"),
    "q5_1": GGUFQuant("Q5_1", "Q8_0", "MOSTLY_Q5_1", 0.0, 0.58, 9.0,
                      "top-1 79.4% / 81.9%, greedy 0/8 / 0/8, mean 1.82 / 4.47 (full sft-lora / 8 steps)"),
    "q5_0": GGUFQuant("Q5_0", "Q8_0", "MOSTLY_Q5_0", 0.0, 0.71, 2.5,
                      "top-1 85.7% / 91.2%, greedy 1/8 / 1/8, mean 1.08 / 1.22 (full sft-lora / 8 steps)"),
    "q4_1": GGUFQuant("Q4_1", "Q8_0", "MOSTLY_Q4_1", 0.0, 0.56, 6.5,
                      "top-1 96.0% / 78.3%, greedy 4/8 / 1/8, mean 0.66 / 3.13 (full sft-lora / 8 steps)"),
    "q4_0": GGUFQuant("Q4_0", "Q8_0", "MOSTLY_Q4_0", 0.0, 0.48, 7.0,
                      "top-1 74.0% / 83.2%, greedy 0/8 / 0/8, mean 3.05 / 3.36 (full sft-lora / 8 steps)"),
}

# Quantizations llama.cpp has that gguf.quants cannot write (the K-quants pick per-block scales by a search that
# lives in llama.cpp's C code, and the i-quants need an importance matrix): named so the refusal says what to do.
EXTERNAL_QUANTS = {"q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq1_s",
                   "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m", "iq4_nl",
                   "iq4_xs", "tq1_0", "tq2_0"}


def quant_of(name: str) -> GGUFQuant:
    key = name.lower()
    if key in QUANTS:
        return QUANTS[key]
    if key in EXTERNAL_QUANTS:
        raise ConfigError(f"--quant {name}: the gguf package cannot write {name} (llama.cpp's C quantizer does). "
                          f"Export f16 here, then run llama.cpp's `llama-quantize model-f16.gguf "
                          f"model-{key}.gguf {name.upper()}`")
    raise ConfigError(f"--quant {name} is not a GGUF quantization posttrain writes; choose one of {sorted(QUANTS)}")


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotary layout (first half / second half of each head) to llama.cpp's interleaved pairs, per head:
    llama.cpp's ``LlamaModel.permute``. ``weight``: (n_head * head_dim, hidden); ``n_head`` is the KV head count
    for k_proj."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise ConfigError("the model config states no rope_theta; a GGUF file needs it (llama.rope.freq_base)")
    return float(theta)


def check_exportable(cfg: Any) -> None:
    """Refuse what the GGUF LLAMA architecture (as transformers reads it back) cannot carry."""
    kind = getattr(cfg, "model_type", None)
    if kind != "llama":
        arch = (getattr(cfg, "architectures", None) or [kind])[0]
        raise ConfigError(f"GGUF export supports the Llama architecture; this model is {arch} (model_type {kind!r})")
    params = getattr(cfg, "rope_parameters", None) or {}
    rope = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    scaling = getattr(cfg, "rope_scaling", None)
    if rope != "default" or (isinstance(scaling, dict) and scaling.get("rope_type", "default") != "default"):
        raise ConfigError(f"GGUF export: rope scaling {rope!r} is not written (the GGUF reader would drop it)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(cfg, flag, False):
            raise ConfigError(f"GGUF export: {flag}=true is not written (transformers' GGUF loader builds a Llama "
                              "without biases)")


def _hparams(writer, cfg: Any, quant: GGUFQuant) -> None:
    import gguf

    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != cfg.hidden_size:  # llama.cpp then needs the head width stated, not derived
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType[quant.file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# llama.cpp names a byte-level BPE by its pre-tokenizer (how text is split before the merges run). Known here by
# the structure of the HF tokenizer's pre_tokenizer: (step type, its deciding option) per step.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
}


def _pre_step(step: dict) -> tuple:
    kind = step.get("type")
    option = {"ByteLevel": step.get("use_regex", True), "Digits": step.get("individual_digits"),
              "Split": (step.get("pattern") or {}).get("Regex")}.get(kind)
    return kind, option


def pre_tokenizer_name(tokenizer) -> str:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {}).get("type")
    if model != "BPE" or spec.get("model", {}).get("byte_fallback"):
        raise ConfigError(f"GGUF export writes byte-level BPE (GPT-2 style) tokenizers; this one is {model}"
                          + (" with byte fallback (sentencepiece style)" if model == "BPE" else ""))
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    key = tuple(_pre_step(s) for s in steps)
    if key not in PRE_TOKENIZERS:
        raise ConfigError(f"GGUF export: the tokenizer's pre-tokenizer {key} has no llama.cpp name posttrain knows "
                          f"(known: {sorted(PRE_TOKENIZERS.values())})")
    return PRE_TOKENIZERS[key]


def _vocab(writer, tokenizer, vocab_size: int, tok_dir: Path, n_vocab: int) -> None:
    """Tokens in id order with their llama.cpp types (control, user-defined, normal, unused holes), then merges,
    special ids, the add-BOS flag and the chat template through gguf.SpecialVocab, as llama.cpp's converter does."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:  # the embedding has rows past the tokenizer's vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=n_vocab)
    # From behaviour rather than from a config flag that may be absent: does encoding text start with BOS?
    ids = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = bool(ids) and ids[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = bool(ids) and ids[-1] == tokenizer.eos_token_id and len(ids) > 1
    special.add_to_gguf(writer, quiet=True)


def _store(array, qtype_name: str, name: str, fallbacks: list[str]):
    """(data, ggml type) for one tensor: quantized when its rows split into whole blocks, else f16."""
    import gguf
    from gguf.quants import quantize

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        fallbacks.append(f"{name} (row of {array.shape[-1]} is not a multiple of {qtype_name}'s block {block})")
        qtype = gguf.GGMLQuantizationType.F16
    return quantize(array, qtype), qtype


def write_gguf(model: torch.nn.Module, tokenizer, path: Path, quant: str = "f16", *, name: str = "") -> dict:
    """Write ``model`` (a merged HF LlamaForCausalLM) and ``tokenizer`` to ``path``; what was stored, returned."""
    import gguf

    spec = quant_of(quant)
    cfg = model.config
    check_exportable(cfg)
    pre_tokenizer_name(tokenizer)  # refuse an unknown tokenizer before any weight is converted
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    if name:
        writer.add_name(name)
    _hparams(writer, cfg, spec)
    with tempfile.TemporaryDirectory() as tok_dir:  # SpecialVocab reads the saved tokenizer files
        tokenizer.save_pretrained(tok_dir)
        model.config.to_json_file(str(Path(tok_dir) / "config.json"))
        _vocab(writer, tokenizer, cfg.vocab_size, Path(tok_dir), cfg.vocab_size)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    counts: dict[str, int] = {}
    fallbacks: list[str] = []
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":  # the reader ties the head to token_embd when output is absent
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"GGUF export: the tensor {hf_name} has no LLAMA name in gguf's tensor map")
        w = t.detach().to(torch.float32).cpu()
        if gguf_name.endswith("attn_q.weight"):
            w = permute_qk(w, heads)
        elif gguf_name.endswith("attn_k.weight"):
            w = permute_qk(w, kv)
        array = w.numpy()
        if array.ndim == 1:
            data, qtype = array, gguf.GGMLQuantizationType.F32
        else:
            big = gguf_name in ("token_embd.weight", "output.weight")
            data, qtype = _store(array, spec.embedding if big else spec.weights, gguf_name, fallbacks)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)  # the writer reads a quantized shape from its bytes
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    params = sum(math.prod(t.shape) for k, t in model.state_dict().items() if not (tied and k == "lm_head.weight"))
    return {"file": path.name, "bytes": path.stat().st_size, "quant": quant.lower(), "tensor_types": counts,
            "f16_fallbacks": fallbacks, "params": params, "bits_per_weight": 8 * path.stat().st_size / params}
