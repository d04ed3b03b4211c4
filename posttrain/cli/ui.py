"""The ``posttrain ui`` subcommand.

Layer 9 (cli): may import any layer. The UI's form checks configs through ``check_config`` below, so the UI itself
never reads posttrain.config.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("posttrain.ui")


def check_config(path: Path, overrides: list[str]) -> dict[str, Any]:
    """The config at ``path`` with ``overrides``, validated as ``posttrain METHOD`` would (ConfigError otherwise),
    as plain data."""
    from posttrain.config import load_config

    return load_config(path, overrides).model_dump(mode="json")


def examples_dir() -> Path | None:
    """The example configs shipped beside the package (the repository's examples/), when they are there."""
    folder = Path(__file__).resolve().parents[2] / "examples"
    return folder if folder.is_dir() else None


def _warm_up() -> None:
    # The figures need posttrain.report, which loads torch (~2 s): loaded while the first page is read, not when
    # the first figure is asked for.
    import posttrain.report.compare  # noqa: F401
    import posttrain.report.run_page  # noqa: F401


def _cmd_ui(args: argparse.Namespace) -> int:
    from posttrain.ui import UI

    t0 = time.perf_counter()
    try:
        ui = UI(args.runs, check_config, host=args.host, port=args.port, model=args.model, dtype=args.dtype,
                api_key=args.api_key or os.environ.get("POSTTRAIN_API_KEY"), examples_dir=examples_dir())
    except OSError as exc:  # port taken, address not available
        log.error("error: cannot listen on %s:%s: %s", args.host, args.port, exc)
        return 2
    log.info("posttrain ui on %s (runs: %s; %s) ready in %.2f s", ui.url, ui.runs_dir,
             "API key required" if ui.api_key else "no API key, loopback only", time.perf_counter() - t0)
    threading.Thread(target=_warm_up, name="posttrain-ui-warm-up", daemon=True).start()
    try:
        ui.httpd.serve_forever()
    except KeyboardInterrupt:
        log.info("stopping (runs started from the form keep going; their folders are under %s)", ui.runs_dir)
    finally:
        ui.stop()
    return 0


def add_commands(sub) -> None:
    """Add ``ui`` to the main parser's subcommands."""
    s = sub.add_parser("ui", help="local web UI: runs with live curves, compare, chat with any run's adapter, start "
                                  "and stop runs from the example configs")
    s.add_argument("--runs", default="runs", help="the runs directory: each subfolder with config.yaml or "
                                                  "metrics.jsonl is a run; runs started here are written to it")
    s.add_argument("--host", default="127.0.0.1", help="listen address; anything but loopback needs --api-key")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--api-key", default=None, help="require this key (login page, or 'Authorization: Bearer KEY'; "
                                                   "default: $POSTTRAIN_API_KEY; none: no key, loopback only)")
    s.add_argument("--model", default=None, help="the chat's base model (default: the embedded "
                                                 "SmolLM2-135M-Instruct); run adapters must fit it")
    s.add_argument("--dtype", default="auto", help="the chat model's dtype (auto: fp32 on CPU, bf16 on GPUs that "
                                                   "support it)")
    s.set_defaults(func=_cmd_ui)
