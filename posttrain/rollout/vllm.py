"""``rollout.engine: vllm``: vLLM as a managed ``vllm serve`` subprocess.

With ``rollout.vllm_python`` (an interpreter that imports vllm, e.g. ``.vllm-venv/bin/python`` from ``make
vllm-venv``; by default this interpreter, when vllm imports here), posttrain starts ``vllm serve`` on the run's
base with runtime LoRA loading and processed log-probs, waits for it (``rollout.start_timeout_s``), drives it as a
``server`` engine (``rollout.client``), restarts it once if it dies, and stops it at the end. vLLM's pins (torch,
transformers) then never meet posttrain's.

Every failure to start names its cause: the interpreter cannot import vllm, the port is taken, memory ran out, or
the server did not answer in time; the server's log is in the run folder (``vllm_server.log``).

Layer 3 (rollout).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from posttrain.engine.distributed import from_rank0, world
from posttrain.errors import ConfigError
from posttrain.rollout.client import PUBLISH_DIR, ServerEngine, ServerError, require_lora
from posttrain.rollout.generate import stop_token_ids
from posttrain.rollout.interface import EngineSettings

LOG_FILE = "vllm_server.log"
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
# (what the log says, what it means) for a server that exited while starting
_CAUSES = (("No module named 'vllm'", "the interpreter cannot import vllm (build .vllm-venv with `make vllm-venv`)"),
           ("No module named vllm", "the interpreter cannot import vllm (build .vllm-venv with `make vllm-venv`)"),
           ("Address already in use", "the port is already in use (set rollout.port, or 0 for a free one)"),
           ("out of memory", "it ran out of memory (lower the KV cache: rollout.vllm_args "
                             "[--gpu-memory-utilization, 0.1], or VLLM_CPU_KVCACHE_SPACE on CPU)"),
           ("OutOfMemory", "it ran out of memory (lower --gpu-memory-utilization in rollout.vllm_args)"),
           ("Cannot allocate memory", "it ran out of memory (lower --gpu-memory-utilization in rollout.vllm_args)"),
           # vLLM's own KV-cache sizing refusals (CPU and GPU): too little left for the cache, or for one sequence
           ("requested memory for kv", "its KV cache does not fit the memory left (change --gpu-memory-utilization "
                                       "or VLLM_CPU_KVCACHE_SPACE)"),
           ("larger than the available KV cache memory", "its KV cache cannot hold one max-length sequence (raise "
                                                         "--gpu-memory-utilization or lower --max-model-len)"))


def vllm_engine(model: torch.nn.Module, tokenizer, settings: EngineSettings, run_dir: Path, base_dir: str) -> Any:
    """A managed ``vllm serve`` from ``rollout.vllm_python``, or from this interpreter when vllm imports here.

    Not an ``LLM`` object in this process: vLLM's V1 engine runs its model in processes of its own even then
    (EngineCore and a worker), so a server from the same interpreter shares exactly as much, and syncs through the
    same adapter endpoint as every other server. Under torchrun, rank 0 starts one server and every process samples
    from it: one engine batches all the processes' requests together (continuous batching), where one engine per
    process would split a GPU's memory N ways and load the base N times."""
    python = settings.vllm_python or (sys.executable if importlib.util.find_spec("vllm") else None)
    if python is None:
        raise ConfigError("rollout.engine: vllm needs vLLM: either rollout.vllm_python, an interpreter that imports "
                          "it (`make vllm-venv` builds .vllm-venv/bin/python), or vllm installed here")
    settings = replace(settings, vllm_python=python)
    engine = ManagedVLLM.launch(model, tokenizer, settings, run_dir, base_dir) if world().main else None
    url = from_rank0(engine.url if engine is not None else None)
    if engine is None:
        require_lora(model, "vllm")
        engine = ServerEngine(tokenizer, url, "base", run_dir / PUBLISH_DIR, timeout_s=settings.request_timeout_s,
                              stops=stop_token_ids(tokenizer, model))
        engine.name = "vllm"
    return engine


def lora_rank(model: torch.nn.Module) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds the policy adapter's rank."""
    r = model.peft_config["default"].r
    return next((k for k in LORA_RANKS if k >= r), r)


def free_port(port: int) -> int:
    """``port`` if it can be bound on 127.0.0.1 (0: any free one); a port in use is an error before anything
    starts."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ConfigError(f"rollout.port: {port} is already in use ({exc.strerror}); set another, or 0 for a "
                              "free one") from None
        return s.getsockname()[1]


def serve_command(python: str, base_dir: str, port: int, dtype: torch.dtype, rank: int, extra: list[str],
                  on_cpu: bool = False) -> list[str]:
    """``vllm serve``'s arguments, through the module (vllm-cpu's ``vllm`` script looks for a package named vllm and
    fails). On a CPU vLLM sizes its KV cache as a share of host memory; 0.15 unless given, as the default (0.9)
    would take most of a shared machine's RAM."""
    memory = [] if not on_cpu or any(a.startswith(("--gpu-memory-utilization", "--kv-cache-memory")) for a in extra) \
        else ["--gpu-memory-utilization", "0.15"]
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", base_dir, "--served-model-name", "base",
            "--host", "127.0.0.1", "--port", str(port), "--dtype", str(dtype).removeprefix("torch."),
            "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", "2",
            "--logprobs-mode", "processed_logprobs", *memory, *extra]


def server_env(on_cpu: bool) -> dict[str, str]:
    """Runtime LoRA loading on; on a CPU, vLLM's threads on every core (by default it binds one core of two and
    reserves the other: 38.5 s against 26.2 s for 16 x 96 tokens on the 2-core machine)."""
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if on_cpu and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{(os.cpu_count() or 1) - 1}"
    return env


class ManagedVLLM(ServerEngine):
    """A ``server`` engine over a ``vllm serve`` process this engine started and owns."""

    name = "vllm"

    def __init__(self, tokenizer, command: list[str], port: int, log_path: Path, publish_dir: Path, *,
                 start_timeout_s: float, timeout_s: float, stops: list[int], env: dict[str, str]):
        super().__init__(tokenizer, f"http://127.0.0.1:{port}/v1", "base", publish_dir, timeout_s=timeout_s,
                         stops=stops)
        self.command, self.log_path, self.start_timeout_s, self.env = command, log_path, start_timeout_s, env
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.closing = False  # no restart while shutting down

    @classmethod
    def launch(cls, model: torch.nn.Module, tokenizer, settings: EngineSettings, run_dir: Path,
               base_dir: str) -> "ManagedVLLM":
        require_lora(model, "vllm with rollout.vllm_python")
        if not (Path(base_dir) / "config.json").is_file():  # vLLM would take it for a hub id and say so, confusingly
            raise ConfigError(f"vllm serve needs the base model as a local HF folder; {base_dir} has no config.json")
        port = free_port(settings.port)
        param = next(model.parameters())
        on_cpu = param.device.type == "cpu"
        command = serve_command(settings.vllm_python, base_dir, port, param.dtype, lora_rank(model),
                                settings.vllm_args, on_cpu)
        engine = cls(tokenizer, command, port, run_dir / LOG_FILE, run_dir / PUBLISH_DIR,
                     start_timeout_s=settings.start_timeout_s, timeout_s=settings.request_timeout_s,
                     stops=stop_token_ids(tokenizer, model), env=server_env(on_cpu))
        print(f"starting {' '.join(command)} (log: {engine.log_path})", file=sys.stderr)
        engine.start()
        return engine

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigError(self.why_it_died())
            try:
                self.request("GET", "/models", timeout_s=5)
                return
            except ServerError:
                time.sleep(0.5)
        self.stop()
        raise ConfigError(f"vllm serve did not answer within rollout.start_timeout_s={self.start_timeout_s:.0f} s "
                          f"(log: {self.log_path}); raise it, or check the log")

    def why_it_died(self) -> str:
        tail = self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""
        cause = next((why for needle, why in _CAUSES if needle in tail), None)
        last = "\n".join(tail.strip().splitlines()[-5:])
        return (f"vllm serve ({self.command[0]}) exited with code {self.proc.returncode} while starting: "
                f"{cause or 'see its log'}. Log: {self.log_path}; its last lines:\n{last}")

    def request(self, method: str, path: str, body: dict | None = None, timeout_s: float | None = None) -> Any:
        try:
            return super().request(method, path, body, timeout_s)
        except ServerError:
            if self.proc is None or self.proc.poll() is None or self.restarts or self.closing:
                raise
        # The server died mid-run: start it once more, publish the current adapter again, repeat the request.
        self.restarts += 1
        print(f"vllm serve died (exit code {self.proc.returncode}); restarting it once (log: {self.log_path})",
              file=sys.stderr)
        self.start()
        if self.current is not None and path != "/load_lora_adapter":
            super().request("POST", "/load_lora_adapter", {"lora_name": self.current[0],
                                                           "lora_path": str(self.current[1].resolve())})
        return super().request(method, path, body, timeout_s)

    def stop(self) -> None:
        """End the server and the engine processes it spawned (its own session: one signal reaches them all)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def close(self) -> None:
        self.closing = True
        try:
            super().close()
        finally:
            self.stop()
