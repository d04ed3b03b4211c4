"""Rollouts from an OpenAI-compatible server, with adapter-only weight sync.

The protocol is vLLM's, so one client drives ``vllm serve`` and ``posttrain serve`` alike:
- sync: the policy's LoRA adapter is written as a new version folder (``save_pretrained`` of the adapter only, a
  few MB, written atomically), loaded with ``POST /v1/load_lora_adapter {lora_name, lora_path}``, and the previous
  version unloaded and deleted. The base weights are never sent (no merge, no full copy; a 4-bit base stays 4-bit).
- sample: ``POST /v1/completions`` per prompt, all at once, with the prompt as token ids (no re-tokenization), ``n``,
  the prompt's ``seed``, ``min_tokens``, ``logprobs: 0`` and ``return_tokens_as_token_ids``, so every sampled token
  comes back as ``token_id:N`` with its log-prob.

The server must report log-probs under softmax(logits / temperature), the distribution the trainer scores under:
start it with ``--logprobs-mode processed_logprobs`` (both servers take that flag). ``check_base`` probes that on
connect, and refuses a server whose log-probs are far from the trainer's (another base, or raw log-probs).

Layer 3 (rollout): imports io, errors, models, rollout.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from posttrain.data.collate import collate_rollouts
from posttrain.engine.distributed import barrier, world
from posttrain.errors import ConfigError
from posttrain.io import atomic_dir
from posttrain.models.forward import evaluating, token_logps
from posttrain.models.loading import pad_id
from posttrain.rollout.generate import stop_token_ids
from posttrain.rollout.interface import EngineSettings, Timer
from posttrain.rollout.sample import Rollout

PUBLISH_DIR = "rollout_adapters"  # in the run folder, unless the server needs another (rollout.adapter_dir)
PROBE_TOLERANCE = 0.5  # mean |logp_server - logp_train| on the probe above which the server is refused
PROBE_WARNING = 0.05  # above this, a warning: more than bf16-vs-fp32 kernels explain


class ServerError(RuntimeError):
    """A request to the rollout server failed; the message names the URL and what the server said."""


class ServerEngine:
    """A rollout engine over HTTP (see the module docstring). ``connect`` checks the server before training."""

    name = "server"

    def __init__(self, tokenizer, url: str, served_model: str, publish_dir: Path, *, api_key: str | None = None,
                 timeout_s: float = 600.0, stops: list[int] | None = None):
        self.tok, self.url, self.base_name = tokenizer, url.rstrip("/"), served_model
        self.publish_dir, self.api_key, self.timeout_s = Path(publish_dir), api_key, timeout_s
        self.stops = stops or []
        self.current: tuple[str, Path] | None = None  # (adapter name, folder) the next sample uses
        self.version, self.sync_s = 0, 0.0
        # The same on every process of a run, different between runs sharing one server.
        self.prefix = "policy-" + hashlib.sha1(str(self.publish_dir.resolve()).encode()).hexdigest()[:10]

    @classmethod
    def connect(cls, model: torch.nn.Module, tokenizer, settings: EngineSettings, run_dir: Path) -> "ServerEngine":
        if not settings.server_url:
            raise ConfigError("rollout.engine: server needs rollout.server_url, the server's OpenAI base URL "
                              "(e.g. http://127.0.0.1:8000/v1)")
        require_lora(model, "server")
        engine = cls(tokenizer, settings.server_url, settings.served_model, run_dir / PUBLISH_DIR,
                     api_key=settings.api_key, timeout_s=settings.request_timeout_s,
                     stops=stop_token_ids(tokenizer, model))
        engine.check_served()
        return engine

    # ---- HTTP ----

    def request(self, method: str, path: str, body: dict | None = None, timeout_s: float | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise ServerError(f"{method} {self.url}{path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ServerError(f"{method} {self.url}{path}: cannot reach the rollout server: "
                              f"{getattr(exc, 'reason', exc)}") from None
        try:
            return json.loads(text) if text.strip() else {}
        except ValueError:
            return {"text": text}  # vLLM answers the adapter endpoints in plain text

    def check_served(self) -> None:
        listed = [m.get("id") for m in self.request("GET", "/models", timeout_s=30).get("data", [])]
        if self.base_name not in listed:
            raise ConfigError(f"rollout.served_model: {self.base_name!r} is not served at {self.url} (it serves "
                              f"{', '.join(map(str, listed)) or 'nothing'}); set rollout.served_model to the base's "
                              "served name")

    # ---- the engine interface ----

    def sync(self, model: torch.nn.Module, version: int) -> None:
        """Under torchrun rank 0 publishes (the weights are the same on every process) and the others wait for it,
        then every process samples from the new version."""
        if self.current is not None and self.version == version:  # already published (the start-up probe's)
            self.sync_s = 0.0
            return
        name, folder = f"{self.prefix}-v{version}", self.publish_dir / f"v{version:06d}"
        with Timer() as took:
            if world().main:
                atomic_dir(folder, lambda tmp: save_adapter(model, tmp))
                self.load(name, folder)
                if self.current is not None and self.current[0] != name:
                    self.drop(*self.current)
            barrier()
        self.current, self.version, self.sync_s = (name, folder), version, took.s

    def load(self, name: str, folder: Path) -> None:
        body = {"lora_name": name, "lora_path": str(folder.resolve())}
        try:
            self.request("POST", "/load_lora_adapter", body)
        except ServerError as exc:
            if "already" not in str(exc):
                raise
            # left loaded by an interrupted run of this folder (a resume): replace it
            self.request("POST", "/unload_lora_adapter", {"lora_name": name})
            self.request("POST", "/load_lora_adapter", body)

    def drop(self, name: str, folder: Path) -> None:
        try:
            self.request("POST", "/unload_lora_adapter", {"lora_name": name})
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def sample(self, prompt_ids: list[list[int]], *, n: int, max_new_tokens: int, temperature: float, top_p: float,
               min_new_tokens: int, seeds: list[int], batch_size: int) -> Rollout:
        """One request per prompt (a request has one seed), all in flight at once: the server batches them."""
        model = self.current[0] if self.current else self.base_name

        def one(prompt: list[int], seed: int) -> list[dict]:
            # Servers seed choice j of a request seeded s with s + j (vLLM's rule): seeds n apart share nothing.
            body = {"model": model, "prompt": prompt, "n": n, "max_tokens": max_new_tokens,
                    "min_tokens": min_new_tokens, "temperature": temperature, "top_p": top_p,
                    "seed": (seed * n) % 2 ** 63,
                    "logprobs": 0, "return_tokens_as_token_ids": True, "stop_token_ids": self.stops}
            choices = sorted(self.request("POST", "/completions", body)["choices"], key=lambda c: c["index"])
            if len(choices) != n:
                raise ServerError(f"{self.url}/completions returned {len(choices)} choices for n={n}")
            return choices

        with ThreadPoolExecutor(max_workers=min(len(prompt_ids), 64)) as pool:
            per_prompt = list(pool.map(one, prompt_ids, seeds))
        completions, logprobs, finished = [], [], []
        for c in (c for choices in per_prompt for c in choices):
            ids, lps = read_choice(c, self.url)
            completions.append(ids)
            logprobs.append(lps)
            finished.append(c.get("finish_reason") == "stop")
        texts = [self.tok.decode(c, skip_special_tokens=True).strip() for c in completions]
        return Rollout([p for p in prompt_ids for _ in range(n)], completions, texts, finished, logprobs,
                       version=self.version)

    def close(self) -> None:
        if not world().main:
            return
        if self.current is not None:
            try:
                self.drop(*self.current)
            except ServerError:
                pass  # the server is gone; the folder is removed all the same
            self.current = None
        shutil.rmtree(self.publish_dir, ignore_errors=True)


def read_choice(choice: dict, url: str) -> tuple[list[int], list[float]]:
    """A completion choice's sampled token ids and their log-probs, from vLLM's ``token_id:N`` token strings."""
    lp = choice.get("logprobs") or {}
    tokens, values = lp.get("tokens"), lp.get("token_logprobs")
    if not tokens or values is None or len(tokens) != len(values):
        raise ServerError(f"{url}/completions returned no per-token logprobs (choice {choice.get('index')}); the "
                          "server must support logprobs and return_tokens_as_token_ids (vLLM and posttrain serve do)")
    try:
        ids = [int(t.split(":", 1)[1]) for t in tokens]
    except (IndexError, ValueError):
        raise ServerError(f"{url}/completions returned tokens as text ({tokens[:3]}...), not 'token_id:N': the "
                          "server ignored return_tokens_as_token_ids") from None
    return ids, [float(v) for v in values]


def require_lora(model: torch.nn.Module, engine: str) -> None:
    if not hasattr(model, "peft_config"):
        raise ConfigError(f"rollout.engine: {engine} syncs the policy as a LoRA adapter, so it needs finetune: lora "
                          "(full fine-tuning would send every weight to the server each step; use rollout.engine: "
                          "hf)")


def save_adapter(model: torch.nn.Module, folder: Path) -> None:
    """The trained LoRA adapter only (``default``: the policy, the actor under PPO), as PEFT writes it."""
    model.save_pretrained(folder, selected_adapters=["default"])


@torch.no_grad()
def probe_mismatch(engine: Any, model: torch.nn.Module, tokenizer, prompt: list[int], temperature: float) -> float:
    """Mean |logp_engine - logp_train| over one sampled completion of ``prompt`` (8 tokens at ``temperature``)."""
    ro = engine.sample([prompt], n=1, max_new_tokens=8, temperature=temperature, top_p=1.0, min_new_tokens=0,
                       seeds=[0], batch_size=1)
    batch = collate_rollouts(ro.prompt_ids, ro.completion_ids, pad_id(tokenizer))
    with evaluating(model):
        train = token_logps(model, batch, temperature)[0, :len(ro.logprobs[0])].float()
    return float((train - torch.tensor(ro.logprobs[0])).abs().mean())


def check_base(engine: Any, model: torch.nn.Module, tokenizer, prompt: list[int], temperature: float) -> float:
    """Refuse an engine whose log-probs of its own samples are far from the trainer's: it serves another base, or
    reports raw log-probs at a temperature other than 1 (start it with --logprobs-mode processed_logprobs). Returns
    the probe's mean |logp_engine - logp_train|."""
    engine.sync(model, 0)
    gap = probe_mismatch(engine, model, tokenizer, prompt, temperature)
    if gap > PROBE_TOLERANCE:
        raise ConfigError(f"the rollout engine at {getattr(engine, 'url', engine.name)} disagrees with the trainer: "
                          f"mean |logp_engine - logp_train| = {gap:.3f} on a probe (tolerance {PROBE_TOLERANCE}). It "
                          "serves another base model (serve this run's model.name), or reports raw log-probs "
                          "(start it with --logprobs-mode processed_logprobs)")
    if gap > PROBE_WARNING:
        print(f"warning: the rollout engine's log-probs are {gap:.3f} from the trainer's on average on a probe; if "
              "the server does not report them after temperature (--logprobs-mode processed_logprobs), the "
              "mismatch metrics and the importance correction are wrong", file=sys.stderr)
    return gap
