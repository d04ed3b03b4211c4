"""The ``posttrain merge`` and ``posttrain export`` subcommands: print what each check found, exit 1 when it failed.

Layer 9 (cli): may import any layer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _print_check(title: str, c: dict) -> None:
    print(f"{title}: max |logit diff| {c['max_abs_logit_diff']:.2e} (mean {c['mean_abs_logit_diff']:.2e}, logits up "
          f"to {c['reference_logit_scale']:.1f}); top-1 along its answers {c['top1_agreement']:.2%} of "
          f"{c['top1_positions']} tokens; greedy continuations identical on {c['greedy_identical']}/{c['prompts']} "
          "prompts")


def _cmd_merge(args: argparse.Namespace) -> int:
    from posttrain.ship import merge_run

    report = merge_run(args.adapter, args.out, model_name=args.model, dtype=args.dtype, device=args.device,
                       prompts=_check_prompts(args.prompts), max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"merged {report['adapter']} into {report['base']} -> {args.out} ({report['dtype']})")
    _print_check("merged vs base+adapter", report["merged_vs_base_plus_adapter"])
    _print_check("saved and reloaded", report["reloaded_vs_base_plus_adapter"])
    if "original_base_merged_vs_base_plus_adapter" in report:
        _print_check("(for comparison) merged into the original, not de-quantized, base",
                     report["original_base_merged_vs_base_plus_adapter"])
    ok = report["reloaded_vs_base_plus_adapter"]
    return 0 if ok["greedy_identical"] == ok["prompts"] else 1


def _check_prompts(path: str | None) -> list[str] | None:
    prompts = Path(path).read_text().splitlines() if path else None
    return [p for p in prompts or [] if p.strip()] or None


def _cmd_export(args: argparse.Namespace) -> int:
    from posttrain.errors import ConfigError
    from posttrain.ship import EXPORT_FORMATS

    if args.format != "gguf":
        given = [f for f, v in (("--quant", args.quant), ("--prompts", args.prompts),
                                ("--max-new-tokens", args.max_new_tokens)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --format gguf; --format {args.format} writes the "
                              "adapter as trained and checks it tensor by tensor")
    options = {"quant": args.quant or "f16", "prompts": _check_prompts(args.prompts),
               "max_new_tokens": args.max_new_tokens or 32} if args.format == "gguf" else {}
    report = EXPORT_FORMATS[args.format](args.adapter, args.out, model_name=args.model, dtype=args.dtype,
                                         device=args.device, **options)
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.format == "gguf":
        print(f"exported {report['adapter']} merged into {report['base']} -> {Path(args.out) / report['file']} "
              f"({report['quant']}, {report['bytes'] / 1e6:.1f} MB, {report['bits_per_weight']:.2f} bits/weight)")
        _print_check("GGUF read back by transformers vs base+adapter", report["gguf_vs_base_plus_adapter"])
        t = report["tokenizer"]
        print(f"tokenizer read back: ids identical on {t['ids_identical']}/{t['prompts']} prompts, chat template "
              f"{'identical' if t['chat_template_identical'] else 'DIFFERENT'}")
        if report["llama_cpp"]:
            c = report["llama_cpp"]
            print(f"llama.cpp: greedy continuations identical on {c['greedy_identical']}/{c['prompts']} prompts")
        for why in report["failures"]:
            print(f"NOT within the {report['quant']} tolerance: {why}")
        for note in report["warnings"]:
            print(f"note (within the {report['quant']} tolerance, {report['tolerance']['measured']} when "
                  f"measured): {note}")
    else:
        print(f"exported {report['adapter']} -> {args.out}: {report['tensors']} tensors, r={report['rank']}, "
              f"alpha={report['alpha']}, base {report['base']}; reloaded through PEFT, max diff "
              f"{report['max_abs_diff_after_reload']:.1e}")
        for note in report["notes"]:
            print(f"note: {note}")
    return 0 if report.get("within_tolerance", True) else 1


def add_commands(sub) -> None:
    """Add ``merge`` and ``export`` to the main parser's subcommands."""
    def shipping_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("adapter", help="a LoRA adapter folder or a run folder")
        q.add_argument("--out", required=True, help="folder to write (replaced atomically)")
        q.add_argument("--model", default=None, help="base model (default: the one the run trained from)")
        q.add_argument("--dtype", default="auto")
        q.add_argument("--device", default="auto")
        q.add_argument("--json", action="store_true", help="print the report as JSON")

    def check_args(q: argparse.ArgumentParser, tokens: int | None) -> None:
        q.add_argument("--prompts", default=None, help="a text file, one check prompt per line (default: 8 built in)")
        q.add_argument("--max-new-tokens", type=int, default=tokens, help="greedy tokens compared per check prompt "
                                                                          "(default: 32)")

    m = sub.add_parser("merge", help="W + (alpha/r) BA into a standalone HF folder, checked against base+adapter "
                                     "(a QLoRA adapter merges into the de-quantized base)")
    shipping_args(m)
    check_args(m, 32)
    m.set_defaults(func=_cmd_merge)

    x = sub.add_parser("export", help="the adapter alone in PEFT format (for PEFT, vLLM, posttrain serve), or the "
                                      "merged model as GGUF (llama.cpp, Ollama); loaded back and checked")
    shipping_args(x)
    x.add_argument("--format", choices=["peft", "gguf"], default="peft",
                   help="peft: the adapter alone; gguf: merged into its base, one .gguf file, read back and "
                        "compared with base+adapter (exit 1 beyond the quantization's tolerance)")
    x.add_argument("--quant", default=None, help="with --format gguf: f16 (default), bf16, f32, q8_0, q5_1, q5_0, "
                                                 "q4_1, q4_0 (K-quants: llama.cpp's llama-quantize on the f16 file)")
    check_args(x, None)  # None: told apart from a value given with --format peft
    x.set_defaults(func=_cmd_export)

