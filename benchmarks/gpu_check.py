"""GPU path check (run on a borrowed H100): bf16 chosen automatically, SFT end to end on CUDA, the fused
LM-head loss equal to the plain one in bf16, and LoRA SFT throughput of random-initialised real architectures.

    python benchmarks/gpu_check.py --tokenizer TOKENIZER_DIR [--out results.json]

No hub is reachable on those machines, so the models are random-initialised from real configs: throughput does
not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARCHS = {  # from the public config.json of each model
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    # A small model of the same family, to try these code paths on a CPU.
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
}


def arch_config(arch: str):
    """The LlamaConfig of one of ``ARCHS`` (long-context RoPE settings of Llama 3)."""
    from transformers import LlamaConfig

    return LlamaConfig(**ARCHS[arch], max_position_embeddings=8192, rope_theta=500000.0)


def tiny_sft(tokenizer_dir: str, work: Path) -> dict:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from posttrain.config import load_config
    from posttrain.recipes.sft import run as run_sft

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(work / "tiny")
    tok.save_pretrained(work / "tiny")
    rnd = random.Random(0)
    rows = [{"messages": [{"role": "user", "content": f"Repeat: {w}"}, {"role": "assistant", "content": w}]}
            for w in (" ".join(rnd.choice(["red", "green", "blue", "cyan"]) for _ in range(rnd.randint(1, 8)))
                      for _ in range(200))]
    (work / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = load_config(None, [f"model.name={work / 'tiny'}", f"data.train={work / 'd.jsonl'}",
                           f"output_dir={work / 'run'}",
                           "data.eval_fraction=0.1", "train.max_steps=30", "train.lr=3e-3", "train.micro_batch_size=2",
                           "eval_samples=1", "finetune=full"], method="sft")
    res = run_sft(c)
    return {"dtype_auto": str(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32),
            "eval_before": res["eval_before"]["eval/loss"], "eval_after": res["eval_after"]["eval/loss"],
            "sample": res["samples"][0]["output"] if res["samples"] else None}


def fused_vs_plain() -> dict:
    from posttrain.losses import linear_cross_entropy_sum, token_cross_entropy_sum

    torch.manual_seed(0)
    h = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(128256, 2048, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_(True)
    t = torch.randint(0, 128256, (4096,), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    ref = token_cross_entropy_sum(h @ w.t(), t)
    gh, gw = torch.autograd.grad(ref, (h, w))
    plain_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = linear_cross_entropy_sum(h, w, t, chunk_size=1024)
    fh, fw = torch.autograd.grad(got, (h, w))
    fused_peak = torch.cuda.max_memory_allocated()
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())
    return {"loss_rel_err": abs(float(got) - float(ref)) / float(ref), "grad_h_rel_err": rel(fh, gh),
            "grad_w_rel_err": rel(fw, gw), "peak_gib_plain": plain_peak / 2**30, "peak_gib_fused": fused_peak / 2**30}


def throughput(arch: str, seq_len: int, batch: int, steps: int = 5, checkpointing: bool = False,
               compiled: bool = False, liger: bool = False) -> dict:
    from transformers import LlamaForCausalLM

    from posttrain.data import Example, collate
    from posttrain.methods import completion_loss_sum
    from posttrain.models import apply_lora

    cfg = arch_config(arch)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    if liger:
        from posttrain.models.kernels import apply_liger

        apply_liger(model, torch.device("cuda"))
    if compiled:
        from posttrain.models.compile import compile_layers

        compile_layers(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    half = seq_len // 2
    rows = [[Example(torch.randint(0, cfg.vocab_size, (seq_len,), generator=g).tolist(),
                     [False] * half + [True] * (seq_len - half))] for _ in range(batch)]
    b = collate(rows, 0)
    torch.cuda.reset_peak_memory_stats()
    times = []
    warmup = 4 if compiled else 2  # compiling happens in the first steps
    for i in range(steps + warmup):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = completion_loss_sum(model, b) / (batch * (seq_len - half))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    tokens = batch * seq_len
    n_params = sum(p.numel() for p in model.parameters())
    # LoRA: forward 2N + activation gradients 2N per token; attention adds ~ 4 * 2 * T * d per token per layer
    # (forward and backward).
    flops = tokens * (4 * n_params + 8 * cfg.num_hidden_layers * seq_len * cfg.hidden_size)
    return {"arch": arch, "seq_len": seq_len, "batch": batch, "checkpointing": checkpointing, "compile": compiled,
            "liger": liger,
            "tokens_per_s": tokens / step, "s_per_step": step, "tflops": flops / step / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compile", action="store_true", help="model.compile: torch.compile per decoder layer")
    ap.add_argument("--liger", action="store_true", help="model.liger: Liger's RMSNorm, RoPE and SwiGLU kernels")
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        out["tiny_sft"] = tiny_sft(args.tokenizer, Path(tmp))
    print(json.dumps(out, indent=1), flush=True)
    out["fused_vs_plain"] = fused_vs_plain()
    print(json.dumps(out["fused_vs_plain"], indent=1), flush=True)
    out["throughput"] = []
    for arch, seq, batch, ckpt in (("llama-3.2-1b", 2048, 4, False), ("llama-3.1-8b", 2048, 2, True)):
        torch.cuda.empty_cache()
        r = throughput(arch, seq, batch, checkpointing=ckpt, compiled=args.compile, liger=args.liger)
        print(json.dumps(r), flush=True)
        out["throughput"].append(r)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
