"""posttrain serve: a burst of requests for several adapters, batched together vs answered one at a time.

Starts the server in this process on the embedded model with the adapters of earlier runs (copied into a
temporary adapter directory), sends the same greedy requests twice, through the `openai` client: all at once
(the scheduler mixes adapters in one forward) and one after another. Prints wall time, tokens/s, the ratio, the
largest batch, and whether every answer was identical in both modes.

    .venv/bin/python benchmarks/bench_serve.py --adapters runs/bench-sft-lora runs/dpo-hh runs/grpo-gsm8k-v2

Without earlier runs, ``--random-adapters N`` serves N LoRA adapters with random weights instead (each changes the
answers, which is all batching needs to be shown correct):

    .venv/bin/python benchmarks/bench_serve.py --random-adapters 2 --per-model 11
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import shutil
import tempfile
import time
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three prime numbers.",
           "Explain what a hash table is in one sentence.", "Give me a tip for a job interview.",
           "What is 12 plus 30?", "Describe a cat in five words.", "Say hello in Spanish."]


def _random_adapter(model, out: Path, *, seed: int) -> str:
    """A rank-8 LoRA on the attention projections with random B (PEFT starts B at zero: a no-op adapter)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # PEFT draws A from the global generator: the same adapters on every run
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    peft.save_pretrained(out)
    peft.unload()  # takes the LoRA layers out of the model again: the server gets the plain base
    return out.name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", nargs="+", default=[], help="run or adapter folders (LoRA, same base)")
    ap.add_argument("--random-adapters", type=int, default=0, help="also serve this many random LoRA adapters")
    ap.add_argument("--per-model", type=int, default=4, help="requests per adapter and for the base")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not args.adapters and not args.random_adapters:
        ap.error("give --adapters or --random-adapters")

    import openai

    from posttrain.models import load_model
    from posttrain.runs import resolve_adapter
    from posttrain.serve.engine import Engine
    from posttrain.serve.server import Server

    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    names = []
    for a in args.adapters:
        name = Path(a).name
        shutil.copytree(resolve_adapter(a), root / name)
        names.append(name)
    loaded = load_model(None)
    for i in range(args.random_adapters):
        names.append(_random_adapter(loaded.model, root / f"random-{i}", seed=i))
    server = Server(Engine(loaded.model, loaded.tokenizer, base_path=loaded.path), root, port=0)
    server.load_adapter_dir()
    server.start()
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600)
    jobs = [(m, PROMPTS[(i + k) % len(PROMPTS)]) for k, m in enumerate(["base", *names])
            for i in range(args.per_model)]

    def ask(job):
        model, prompt = job
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=args.max_tokens)
        return r.choices[0].message.content, r.usage.completion_tokens

    try:
        ask(jobs[0])  # warm-up
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(len(jobs)) as ex:
            burst = list(ex.map(ask, jobs))
        t_burst = time.perf_counter() - t
        stats = dict(server.engine.stats)
        t = time.perf_counter()
        alone = [ask(j) for j in jobs]
        t_alone = time.perf_counter() - t
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    tokens = sum(n for _, n in burst)
    result = {"requests": len(jobs), "models": ["base", *names], "max_tokens": args.max_tokens,
              "completion_tokens": tokens, "burst_s": round(t_burst, 2), "one_at_a_time_s": round(t_alone, 2),
              "burst_tokens_per_s": round(tokens / t_burst, 1), "alone_tokens_per_s": round(tokens / t_alone, 1),
              "speedup": round(t_alone / t_burst, 2), "max_rows_in_a_forward": stats["max_rows"],
              "max_adapters_in_a_forward": stats["max_adapters"],
              "identical_answers": sum(a[0] == b[0] for a, b in zip(burst, alone))}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
