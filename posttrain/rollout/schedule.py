"""The batch schedule of online RL: which prompts each rollout samples, seeded sampling, and micro-batches.

The engine asks a schedule for the micro-batches of an optimizer step; an RL schedule answers with rollouts
sampled from the current policy. Rollout ``k`` serves optimizer steps ``k * mu`` .. ``k * mu + mu - 1``. Prompts
are visited in a seeded permutation per epoch and sampling is seeded by the rollout number, so a run resumed at a
rollout boundary samples what the uninterrupted run sampled. GRPO and PPO differ only in ``make_batches``: how a
rollout's completions become scored micro-batches (``methods.grpo.grpo_schedule``, ``methods.ppo.ppo_schedule``).
The completions come from a rollout engine (``rollout.engines``), synced to the policy before each rollout.

Under torchrun each process samples and scores its share of the rollout's prompts, whole groups only (its
contiguous slice of the prompt order), so group advantages need no communication; the loop all-reduces the
gradients and the loss count. Each completion draws from its own generator, seeded by its prompt's place in the
rollout, so N processes sample exactly what one process samples.

Layer 3 (rollout): imports data, models, rollout.
"""

from __future__ import annotations

import random
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from posttrain.data.collate import collate_rollouts
from posttrain.engine.distributed import gather_ranks, world
from posttrain.errors import ConfigError
from posttrain.models.forward import Batch
from posttrain.models.loading import pad_id as pad_id_of
from posttrain.rollout.interface import HFEngine, RolloutEngine, Timer
from posttrain.rollout.sample import Rollout

RewardFn = Callable[..., list[float]]


def generation_batch(completions: int, micro_batch_size: int, cap: int = 64) -> int:
    """Rows decoded together. A decode step reads every weight once whatever the batch, so on a CPU (and a GPU at
    small batch) one batch of all the rollout's completions costs about what one micro-batch costs."""
    return max(micro_batch_size, min(completions, cap))


class RolloutSchedule:
    """The engine's ``StepBatches`` for online RL. ``make_batches(schedule, rollout)`` returns the micro-batches of
    one rollout, sampled (``sample``), scored (``score``), with everything the method's loss reads; it may record
    the rollout in ``schedule.last_rollout``. ``engine`` samples (default: posttrain's own sampler on ``model``)."""

    def __init__(self, model: torch.nn.Module, tokenizer, prompts: list[list[int]], rows: list[dict[str, Any]],
                 chats: list[Any], *, make_batches: Callable[[RolloutSchedule, int], list[Batch]],
                 prompts_per_step: int, mu: int, micro_batch_size: int, seed: int, share_prompt: bool = True,
                 watch: RewardFn | None = None, engine: RolloutEngine | None = None, ahead: bool = False):
        self.make_batches = make_batches
        self.engine = engine or HFEngine(model, tokenizer)
        if ahead and self.engine.name == "hf":
            raise ConfigError("rollout.async_ahead needs an engine of its own (rollout.engine: server or vllm): the hf "
                              "sampler decodes with the very weights being trained")
        # ahead: rollout k + 1 is sampled (from the policy of rollout k) while the trainer works on rollout k
        self.ahead, self.total_rollouts = ahead, None  # the recipe sets total_rollouts: no prefetch past the end
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="posttrain-rollout") if ahead else None
        self._pending: dict[int, tuple[list[int], Future]] = {}
        self.timing: dict[str, float] = {}
        self.model, self.tok, self.prompts, self.rows, self.chats = model, tokenizer, prompts, rows, chats
        self.per_step, self.mu, self.micro, self.seed = prompts_per_step, mu, micro_batch_size, seed
        self.share_prompt, self.watch = share_prompt, watch
        self.pad_id = pad_id_of(tokenizer)
        w = world()
        self.rank, self.ranks = w.rank, w.size
        if prompts_per_step % self.ranks:
            raise ConfigError(f"prompts_per_step ({prompts_per_step}) must split evenly over the {self.ranks} "
                              "processes: each samples whole prompt groups")
        self._cached: tuple[int, list[Batch]] | None = None
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, its prompt permutation)
        self.last_rollout: dict[str, Any] = {}

    def steps_for(self, epochs: float) -> int:
        rollouts = max(1, round(epochs * len(self.prompts) / self.per_step))
        return rollouts * self.mu

    def step(self, step: int) -> list[Batch]:
        rollout = step // self.mu
        if self._cached is None or self._cached[0] != rollout:
            self._cached = (rollout, self.make_batches(self, rollout))
        return self._cached[1]

    def prompt_indices(self, rollout: int) -> list[int]:
        out = []
        for k in range(rollout * self.per_step, (rollout + 1) * self.per_step):
            epoch, i = divmod(k, len(self.prompts))
            if self._order[0] != epoch:
                order = list(range(len(self.prompts)))
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
                self._order = (epoch, order)
            out.append(self._order[1][i])
        return out

    def share(self, rollout: int) -> tuple[list[int], list[int]]:
        """This process's share of the rollout's prompt indices, and each prompt's seed (its place in the run)."""
        idx = self.prompt_indices(rollout)
        size = len(idx) // self.ranks
        lo = self.rank * size
        return idx[lo:lo + size], [self.seed * 1_000_003 + rollout * self.per_step + lo + k for k in range(size)]

    def _submit(self, rollout: int, n: int, sampling: dict[str, Any]) -> tuple[list[int], Future]:
        """The rollout's prompt indices (this process's share) and its completions, being sampled (ahead) or done."""
        idx, seeds = self.share(rollout)
        call = lambda: self.engine.sample([self.prompts[i] for i in idx], n=n, seeds=seeds,  # noqa: E731
                                          batch_size=generation_batch(len(idx) * n, self.micro), **sampling)
        if self._pool is not None:
            return idx, self._pool.submit(call)
        done: Future = Future()
        done.set_result(call())
        return idx, done

    def sample(self, rollout: int, n: int, **sampling: Any) -> tuple[list[int], Rollout]:
        """This process's share of the rollout's prompt indices and ``n`` completions of each, from the engine
        synced to the current policy (version = the rollout number).

        With ``ahead``, the completions were sampled while the previous rollout trained, from the policy one update
        older (the first rollout, and the first after a resume, are sampled now); rollout k + 1 is then started
        from the current policy before this returns. ``rollout/lag`` logs how many updates old the samples are."""
        sync_s = 0.0
        with Timer() as took:
            pending = self._pending.pop(rollout, None)
            if pending is None:
                self.engine.sync(self.model, rollout)
                sync_s += self.engine.sync_s
                pending = self._submit(rollout, n, sampling)
            idx, future = pending
            ro = future.result()
            if self.ahead and (self.total_rollouts is None or rollout + 1 < self.total_rollouts):
                self.engine.sync(self.model, rollout)  # a no-op when this rollout was sampled just now
                sync_s += self.engine.sync_s
                self._pending[rollout + 1] = self._submit(rollout + 1, n, sampling)
        self.timing = {"rollout/sample_s": took.s - sync_s, "rollout/sync_s": sync_s,
                       "rollout/lag": float(rollout - ro.version)}
        return idx, ro

    def drain(self) -> None:
        """Wait for a rollout still being sampled (ahead), so the engine can be stopped."""
        for _, future in self._pending.values():
            future.cancel() or future.exception()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def score(self, fn: RewardFn, idx: list[int], n: int, ro: Rollout) -> list[float]:
        """A reward function on the completions, with each prompt's chat and row columns repeated n times, and
        ``completion_tokens`` (each completion's length in tokens, e.g. for the ``overlong`` reward)."""
        columns = {k: [self.rows[i].get(k) for i in idx for _ in range(n)] for k in self.rows[idx[0]]}
        columns["completion_tokens"] = [len(c) for c in ro.completion_ids]
        return fn([self.chats[i] for i in idx for _ in range(n)], ro.texts, **columns)

    def sample_more(self, rollout: int, draw: int, n: int, **sampling: Any) -> tuple[list[int], Rollout]:
        """Another ``prompts_per_step`` prompts for the same rollout (dynamic sampling's draw ``draw`` >= 1): a
        seeded choice without replacement from the whole prompt set, this process's share of it, and ``n``
        completions each from the engine as it stands (synced for this rollout). Seeded by (seed, rollout, draw),
        so a resumed run draws the same."""
        picked = random.Random(f"{self.seed}/{rollout}/{draw}").sample(range(len(self.prompts)),
                                                                       min(self.per_step, len(self.prompts)))
        size = len(picked) // self.ranks
        lo = self.rank * size
        idx = picked[lo:lo + size]
        base = self.seed * 1_000_003 + (draw * 1_000_033 + rollout) * self.per_step * 7 + lo
        seeds = [base + k for k in range(len(idx))]
        ro = self.engine.sample([self.prompts[i] for i in idx], n=n, seeds=seeds,
                                batch_size=generation_batch(len(idx) * n, self.micro), **sampling)
        return idx, ro

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """This process's per-completion values joined with every other process's, in rank order (the rollout's
        order): the whole rollout, for estimators with batch statistics. The values themselves in one process."""
        return gather_ranks(values)

    def share_of(self, values: torch.Tensor) -> torch.Tensor:
        """This process's slice of ``gather``'s result."""
        size = values.shape[0] // self.ranks
        return values[self.rank * size:(self.rank + 1) * size]

    def rollout_metrics(self, idx: list[int], n: int, ro: Rollout) -> dict[str, torch.Tensor]:
        """Completion length, truncation, and the watch terms (scored, logged, never trained on)."""
        lengths = torch.tensor([len(c) for c in ro.completion_ids], dtype=torch.float64)
        out = {"completion_len": lengths.mean(),
               "truncated": 1.0 - torch.tensor(ro.finished, dtype=torch.float64).mean(),
               **{k: torch.tensor(v, dtype=torch.float64) for k, v in self.timing.items()}}
        if self.watch is not None:
            out["watch"] = torch.tensor(self.score(self.watch, idx, n, ro), dtype=torch.float64).mean()
            out.update(part_metrics(getattr(self.watch, "parts", {}), "watch"))
        return out

    def micro_batches(self, ro: Rollout) -> list[Batch]:
        """The rollout as collated micro-batches, each with the engine's log-probs as ``engine_logp`` (N, L)."""
        out = []
        for k in range(0, len(ro.texts), self.micro):
            b = collate_rollouts(ro.prompt_ids[k:k + self.micro], ro.completion_ids[k:k + self.micro], self.pad_id,
                                 self.share_prompt)
            engine_logp = torch.zeros(b["completion_mask"].shape)
            for i, lp in enumerate(ro.logprobs[k:k + self.micro]):
                engine_logp[i, :len(lp)] = torch.tensor(lp)
            b["engine_logp"] = engine_logp
            out.append(b)
        return out


def part_metrics(parts: dict[str, list[float]], prefix: str) -> dict[str, torch.Tensor]:
    """The mean of each term of a combined reward's ``parts`` (weights, ``name@w``, left out)."""
    return {f"{prefix}/{name}": torch.tensor(part, dtype=torch.float64).mean()
            for name, part in parts.items() if not name.endswith("@w")}


def mean_scores(fn: RewardFn, prefix: str, chats: list[Any], ro: Rollout,
                rows: list[dict[str, Any]]) -> dict[str, float]:
    """A reward's mean over completions of the given prompts (one each), and its terms' means."""
    columns = {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}
    scores = fn(chats, ro.texts, **columns, completion_tokens=[len(c) for c in ro.completion_ids])
    return {prefix: sum(scores) / max(len(scores), 1),
            **{k: float(v) for k, v in part_metrics(getattr(fn, "parts", {}), prefix).items()}}
