"""The fastest LoRA SFT could run on this machine with today's kernels: a bound for bench_sft's FLOP fraction.

On bench_sft's data, model and packed micro-batches, this times the work a LoRA SFT step cannot skip, each part
alone and at its best over several tries:

- the decoder's matmuls: every projection with its LoRA adapter, forward and backward, as posttrain's LoRA linear
  runs it, for one layer's (tokens x hidden) input, times the number of layers;
- causal attention forward and backward, as posttrain runs it (``segment_attention``: SDPA per example), times
  the number of layers;
- the LM head on the trained positions, as the chunked loss runs it (matmul, log-softmax, gradient matmul).

Everything else counts as free: norms, RoPE, activations, residual adds, the optimizer and Python. The sum is a
lower bound on the step time with these kernels. Turned into tokens/s and 4N FLOPs per token against the same
2048^3 matmul ceiling bench_sft uses, it is the highest FLOP-ceiling fraction bench_sft could report here.

    .venv/bin/python benchmarks/sft_bound.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from bench_sft import LORA, SEED, base_param_count, load_chats, matmul_gflops  # noqa: E402


def best_seconds(fn, tries: int) -> float:
    fn()  # warm: first-touch pages and kernel selection are not the kernel's speed
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def layer_matmuls(arch, tokens: int, r: int, scale: float):
    """One decoder layer's projections with LoRA on every one, forward and backward, on (tokens, hidden), through
    posttrain's LoRA linear (one matmul with W + s B A when the rows are many)."""
    from posttrain.models.lora import lora_linear

    shapes = arch.linear_shapes()
    assert set(shapes) == set(LORA["targets"])
    mods = {k: (torch.randn(o, i) * 0.02, (torch.randn(r, i) * 0.02).requires_grad_(),
                (torch.randn(o, r) * 0.02).requires_grad_()) for k, (i, o) in shapes.items()}
    inputs = {k: torch.randn(tokens, i, requires_grad=True) for k, (i, o) in shapes.items()}

    def run() -> None:
        outs = [lora_linear(inputs[k], w, None, a, b, scale) for k, (w, a, b) in mods.items()]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return run


def attention(arch, layout):
    from posttrain.models.attention import Layout, segment_attention

    d = arch.head_dim
    b, t = len(layout), sum(layout[0])
    q = torch.randn(b, arch.num_heads, t, d, requires_grad=True)
    k, v = (torch.randn(b, arch.num_kv_heads, t, d, requires_grad=True) for _ in range(2))
    module = SimpleNamespace(training=True)

    def run() -> None:
        out, _ = segment_attention(module, q, k, v, None, scaling=d ** -0.5, packed_segments=Layout(layout))
        out.backward(torch.ones_like(out))

    return run


def head(weight: torch.Tensor, targets: torch.Tensor):
    from posttrain.losses.cross_entropy import linear_cross_entropy_sum

    hidden = torch.randn(targets.shape[0], weight.shape[1], requires_grad=True)

    def run() -> None:
        linear_cross_entropy_sum(hidden, weight, targets).backward()

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="rows per micro-batch, as bench_sft's --batch")
    p.add_argument("--micro-batches", type=int, default=3, help="how many of the plan's micro-batches to time")
    p.add_argument("--tries", type=int, default=3)
    args = p.parse_args()

    from posttrain.data import render_example, sft_schedule
    from posttrain.models import load_model
    from posttrain.models.forward import model_inputs
    from posttrain.plan.arch import arch_from_config

    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    loaded = load_model(args.model, dtype="float32", device="cpu")
    tok = loaded.tokenizer
    arch = arch_from_config(loaded.model.config.to_dict(), name="model", source="the loaded model's config")
    n_params = base_param_count(loaded.model)
    weight = loaded.model.get_output_embeddings().weight.detach()
    examples = [render_example(tok, c) for c in load_chats(args.examples, args.max_len, tok)[0]]
    plan = sft_schedule(examples, micro_batch_size=args.batch, grad_accum=1, seed=SEED, pad_id=tok.pad_token_id,
                        packing=True, max_seq_len=args.max_len)

    ceiling = matmul_gflops()
    totals = {"matmuls": 0.0, "attention": 0.0, "head": 0.0}
    tokens = 0
    for step in range(args.micro_batches):
        (batch,) = plan.step(step)
        _, kwargs, targets, keep = model_inputs(loaded.model, batch)  # what SFT feeds the model
        n = int(kwargs["input_ids"].numel())
        layout = kwargs["packed_segments"].rows
        targets = targets[keep]
        parts = {"matmuls": layer_matmuls(arch, n, LORA["r"], LORA["alpha"] / LORA["r"]),
                 "attention": attention(arch, layout), "head": head(weight, targets)}
        times = {k: best_seconds(fn, args.tries) for k, fn in parts.items()}
        times["matmuls"] *= arch.num_layers
        times["attention"] *= arch.num_layers
        for k in totals:
            totals[k] += times[k]
        tokens += n
        ceiling = max(ceiling, matmul_gflops())
        print(f"micro-batch {step}: {n} tokens, {targets.numel()} trained, {sum(map(len, layout))} examples; "
              + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()), flush=True)

    seconds = sum(totals.values())
    bound = tokens / seconds
    flop_s = 4 * n_params * bound / 1e9
    print(f"\nfp32 2048^3 matmul ceiling (best reading): {ceiling:.1f} GFLOP/s; 4N = 4 x {n_params / 1e6:.1f} M")
    print("| part | seconds per 1000 tokens | share of the bound |\n|---|---:|---:|")
    for k, v in totals.items():
        print(f"| {k} | {1000 * v / tokens:.2f} | {100 * v / seconds:.0f}% |")
    print(f"\nbound: {bound:.0f} tokens/s = {100 * flop_s / ceiling:.0f}% of the FLOP ceiling "
          f"(everything but these kernels free)")
    no_attn = tokens / (seconds - totals["attention"])
    print(f"without attention at all: {no_attn:.0f} tokens/s = "
          f"{100 * 4 * n_params * no_attn / 1e9 / ceiling:.0f}% of the FLOP ceiling")


if __name__ == "__main__":
    main()
