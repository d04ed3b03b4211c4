"""The rollout-engine interface: what samples GRPO's and PPO's completions (the table of engines: ``engines``).

One interface for every engine: prompts (token ids) in; completion token ids, the engine's per-token log-probs of
the sampled tokens, and finish reasons out (``Rollout``). The trainer re-scores every completion itself, so an
engine's log-probs are used only to measure and correct the train-inference mismatch (``losses.offpolicy``).

- ``hf``: posttrain's own decode loop on the training model itself (``rollout.sample``). Nothing to sync: it samples
  the live weights. The default, and what the tests use.
- ``server``: any OpenAI-compatible server that hot-loads LoRA adapters under vLLM's endpoint names
  (``/v1/load_lora_adapter``), ``posttrain serve`` or ``vllm serve`` (``rollout.client``).
- ``vllm``: a ``vllm serve`` subprocess that posttrain starts from ``rollout.vllm_python`` (or this interpreter,
  when vllm imports here), owns, and drives as a ``server`` (``rollout.vllm``).

Weight sync is ``sync(model, version)`` before each rollout: the server engines publish the LoRA adapter as a new
version (a few MB) and sample from it; the base weights never move.

Layer 3 (rollout): imports models, io and errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from posttrain.rollout.sample import Rollout, sample_completions


@dataclass
class EngineSettings:
    """The ``rollout`` section as plain values; no defaults here (``config.RolloutSection`` declares them)."""
    engine: str
    server_url: str | None
    served_model: str
    api_key: str | None
    vllm_python: str | None
    vllm_args: list[str]
    port: int
    start_timeout_s: float
    request_timeout_s: float


class RolloutEngine(Protocol):
    """What GRPO and PPO sample from."""

    name: str
    sync_s: float  # seconds the last ``sync`` took (logged as rollout/sync_s)

    def sync(self, model: torch.nn.Module, version: int) -> None:
        """Make the next ``sample`` draw from ``model``'s current weights, published as policy ``version``."""

    def sample(self, prompt_ids: list[list[int]], *, n: int, max_new_tokens: int, temperature: float, top_p: float,
               min_new_tokens: int, seeds: list[int], batch_size: int) -> Rollout:
        """``n`` completions of each prompt; prompt i's are repeatable from ``seeds[i]`` alone, whichever other
        prompts share the call (so a rollout split over processes samples what one process samples)."""

    def close(self) -> None:
        """Stop what the engine started (servers, published adapters)."""


class HFEngine:
    """posttrain's own sampler on the training model: KV cache, merged LoRA, seeded per call."""

    name = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.version, self.sync_s = 0, 0.0

    def sync(self, model: torch.nn.Module, version: int) -> None:
        self.model, self.version, self.sync_s = model, version, 0.0

    def sample(self, prompt_ids: list[list[int]], *, n: int, max_new_tokens: int, temperature: float, top_p: float,
               min_new_tokens: int, seeds: list[int], batch_size: int) -> Rollout:
        # Per-completion generators leave the global RNG as it was: a resumed run samples what the uninterrupted
        # one sampled, whatever else consumed random numbers in between.
        ro = sample_completions(self.model, self.tokenizer, prompt_ids, n=n, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, min_new_tokens=min_new_tokens,
                                batch_size=batch_size, seeds=seeds)
        ro.version = self.version
        return ro

    def close(self) -> None:
        pass


class Timer:
    """Wall seconds of a block, kept in ``.s``."""

    def __enter__(self) -> "Timer":
        self.t0, self.s = time.perf_counter(), 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self.t0
