"""The ``posttrain serve`` subcommand.

Layer 9 (cli): may import any layer.
"""

from __future__ import annotations

import argparse
import os


def _cmd_serve(args: argparse.Namespace) -> int:
    from posttrain.serve.server import serve

    return serve(model=args.model, adapter_dir=args.adapter_dir, host=args.host, port=args.port,
                 api_key=args.api_key or os.environ.get("POSTTRAIN_API_KEY"), served_name=args.served_name,
                 max_batch=args.max_batch, dtype=args.dtype, timeout_s=args.timeout,
                 quantization=args.quantization, header_timeout_s=args.header_timeout,
                 body_timeout_s=args.body_timeout, max_connections=args.max_connections,
                 logprobs_mode=args.logprobs_mode)


def add_commands(sub) -> None:
    """Add ``serve`` to the main parser's subcommands."""
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server: one base model, many LoRA adapters batched "
                                     "together")
    s.add_argument("--model", default=None, help="base model folder, GGUF file or hub id (default: the embedded "
                                                 "SmolLM2-135M-Instruct)")
    s.add_argument("--adapter-dir", required=True,
                   help="adapters are loaded from here only: each subfolder with adapter_config.json (or a run "
                        "folder with adapter/) is served under its folder name")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: "
                                                   "$POSTTRAIN_API_KEY; none: no key needed)")
    s.add_argument("--served-name", default="base", help="the base model's name in requests and /v1/models")
    s.add_argument("--max-batch", type=int, default=16, help="most sequences decoded together")
    s.add_argument("--dtype", default="auto", help="auto: fp32 on CPU, bf16 on GPUs that support it")
    s.add_argument("--quantization", choices=["none", "nf4"], default="none",
                   help="nf4: hold the base in 4 bits, as QLoRA adapters were trained (they are refused otherwise)")
    s.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may wait for its next token before it is abandoned (504), and a "
                        "blocked write to a client may take before the connection is dropped")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds for a request's line and headers to arrive (connection closed), counted from the "
                        "end of the previous request on a keep-alive connection")
    s.add_argument("--body-timeout", type=float, default=10.0,
                   help="seconds for a request body to arrive (408)")
    s.add_argument("--max-connections", type=int, default=128,
                   help="open connections at most (one thread each); more get 503")
    s.add_argument("--logprobs-mode", choices=["raw_logprobs", "processed_logprobs"], default="raw_logprobs",
                   help="vLLM's flag: which distribution reported logprobs come from; raw_logprobs: the model's "
                        "log_softmax, processed_logprobs: after temperature (top_p is applied in neither)")
    s.set_defaults(func=_cmd_serve)
