"""Online (iterative) DPO: the policy makes its own preference pairs, round by round.

Round r serves optimizer steps r * S .. r * S + S - 1 (S = ``steps_per_round``). At its first step:

1. sample: ``prompts_per_round`` prompts (a seeded pass over the data, as GRPO's rollouts visit them), k completions
   each, from the rollout engine synced to the policy as it is now;
2. score and pick (``PICKS``): each completion's reward (a reward model, verifiable rewards), or a round robin of
   pairwise judge verdicts taken in both orders (``judge.pairwise.both_orders``), where a completion's score is its
   wins; the best and the worst become a pair. Dropped, and counted by why: ties (best and worst score the same),
   inconsistent verdicts (the judge's two orders disagree on best vs worst), intransitive ones (the judge prefers
   the worst to the best directly, although the best has more wins);
3. reference log-probs of every kept pair, once: the starting policy's (``reference: initial``; with LoRA the policy
   with its adapters off) or the current policy's (``each_round``: at this moment it is the reference);
4. every prompt's record is written to ``rounds/round-RRR.jsonl`` before a step trains on it: the k samples and
   their scores, the outcome, and for kept pairs the sampled token ids and reference log-probs. A resumed run reads
   the round back instead of sampling it again, so it trains on exactly the pairs the interrupted run drew;
5. S DPO steps over the round's pairs (a seeded ``StepSchedule``: a resumed step takes the same micro-batches).

Pairs are the sampled token ids themselves (prompt ids + completion ids, as sampled), never decoded and re-encoded,
so the tokens trained are the tokens the policy produced. The loss is any entry of ``losses.PREFERENCE_LOSSES``
(``methods.dpo.PreferenceMethod``); a round's statistics ride along every batch of its steps as ``online/*``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from posttrain.data.collate import pair_batches
from posttrain.data.pairs import Pair
from posttrain.data.render import Example
from posttrain.data.schedule import StepSchedule, pair_schedule
from posttrain.io import atomic_write_text
from posttrain.judge.pairwise import Judge, both_orders, win_rate
from posttrain.methods.dpo import PreferenceMethod
from posttrain.models.forward import Batch, evaluating
from posttrain.models.reference import Reference
from posttrain.rollout.sample import Rollout, sample_completions
from posttrain.rollout.schedule import RewardFn, RolloutSchedule, mean_scores

OUTCOMES = ("kept", "tie", "inconsistent", "intransitive")


@dataclass(frozen=True)
class Pick:
    """What one prompt's k samples gave: the chosen and rejected sample (None unless kept), every sample's score,
    and the outcome (one of ``OUTCOMES``)."""
    chosen: int | None
    rejected: int | None
    scores: list[float]
    outcome: str


def pick_by_scores(scores: list[float]) -> Pick:
    """Best against worst by score (the first of equals); a tie when they score the same."""
    best = max(range(len(scores)), key=scores.__getitem__)
    worst = min(range(len(scores)), key=scores.__getitem__)
    if scores[best] == scores[worst]:
        return Pick(None, None, scores, "tie")
    return Pick(best, worst, scores, "kept")


def pick_by_judge(judge: Judge, prompt: str, texts: list[str], criterion: str, margin: float = 0.0) -> Pick:
    """A round robin of both-order verdicts: a win is 1, a tie 1/2 to each, an inconsistent verdict nothing;
    scores are wins / (k - 1). The pair is the most and the fewest wins, kept only when the judge's own verdict on
    those two agrees in both orders and favours the one with more wins."""
    k = len(texts)
    wins = [0.0] * k
    verdicts = {}
    for i in range(k):
        for j in range(i + 1, k):
            v = both_orders(judge, prompt, texts[i], texts[j], criterion, margin=margin).verdict
            verdicts[i, j] = v
            if v == "a":
                wins[i] += 1
            elif v == "b":
                wins[j] += 1
            elif v == "tie":
                wins[i] += 0.5
                wins[j] += 0.5
    scores = [w / (k - 1) for w in wins]
    best = max(range(k), key=wins.__getitem__)
    worst = min(range(k), key=wins.__getitem__)
    if wins[best] == wins[worst]:
        every = set(verdicts.values())
        return Pick(None, None, scores, "inconsistent" if every == {"inconsistent"} else "tie")
    direct = verdicts[min(best, worst), max(best, worst)]
    says_best = {"a": min(best, worst), "b": max(best, worst)}.get(direct)
    if direct in ("tie", "inconsistent"):
        return Pick(None, None, scores, direct)
    if says_best != best:
        return Pick(None, None, scores, "intransitive")
    return Pick(best, worst, scores, "kept")


def prompt_text(chat: list[dict[str, Any]]) -> str:
    """What a judge reads as the request: the user's text, or the whole dialogue as ``role: text`` lines (prompt
    chats are already validated, their contents text)."""
    if len(chat) == 1:
        return str(chat[0]["content"])
    return "\n".join(f"{m['role']}: {m['content']}" for m in chat)


def sampled_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], row: int,
                 index: int) -> Pair:
    """A pair of sampled completions as they were sampled: the prompt's ids untrained, the completion's trained."""
    def example(ids: list[int]) -> Example:
        return Example(list(prompt_ids) + list(ids), [False] * len(prompt_ids) + [True] * len(ids), row=row)
    return Pair(example(chosen_ids), example(rejected_ids), [], row, index)


@dataclass
class Round:
    """One round's kept pairs, their reference log-probs ((pairs, 2), None when the loss needs none), the batches
    of its steps, and the statistics logged with them."""
    pairs: list[Pair]
    ref: torch.Tensor | None
    schedule: StepSchedule | None
    metrics: dict[str, torch.Tensor]


def round_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    """Counts by outcome, the kept share, and the mean score of all samples, the chosen and the rejected."""
    kept = [r for r in records if r["outcome"] == "kept"]
    out = {f"online/{o}": float(sum(r["outcome"] == o for r in records)) for o in OUTCOMES}
    out["online/kept_share"] = len(kept) / max(len(records), 1)
    every = [s for r in records for s in r["scores"]]
    out["online/sample_score"] = sum(every) / max(len(every), 1)
    if kept:
        out["online/chosen_score"] = sum(r["scores"][r["chosen"]] for r in kept) / len(kept)
        out["online/rejected_score"] = sum(r["scores"][r["rejected"]] for r in kept) / len(kept)
    lengths = [n for r in records for n in r["lengths"]]
    out["online/completion_len"] = sum(lengths) / max(len(lengths), 1)
    return out


class OnlineRounds:
    """The loop's ``StepBatches`` for online DPO (see the module docstring). ``sampler`` is a ``RolloutSchedule``
    with ``prompts_per_step = prompts_per_round``: its seeded prompt order, per-prompt sampling seeds, engine sync
    and per-process share are reused, with one rollout per round. ``pick(prompt_index, texts, scores_or_none)``
    returns a ``Pick``; ``reward``, when given, scores the samples first (the judge scorer passes None).
    ``reference`` computes a round's reference log-probs at its start (None for a reference-free loss)."""

    def __init__(self, sampler: RolloutSchedule, pick: Callable[[int, list[str], list[float] | None], Pick],
                 reward: RewardFn | None, reference: Reference | None, *, folder: Path, steps_per_round: int,
                 samples: int, sampling: dict[str, Any], micro_batch_size: int, grad_accum: int, max_seq_len: int,
                 scorer: str):
        self.sampler, self.pick, self.reward, self.reference = sampler, pick, reward, reference
        self.folder, self.per_round, self.k, self.sampling = folder, steps_per_round, samples, sampling
        self.micro, self.accum, self.max_seq_len, self.scorer = micro_batch_size, grad_accum, max_seq_len, scorer
        self._round: tuple[int, Round] | None = None

    def path(self, r: int) -> Path:
        rank = self.sampler.rank
        return self.folder / (f"round-{r:03d}.jsonl" if rank == 0 else f"round-{r:03d}.rank{rank}.jsonl")

    def step(self, step: int) -> list[Batch]:
        r, j = divmod(step, self.per_round)
        if self._round is None or self._round[0] != r:
            self._round = (r, self.build(r, step))
        rnd = self._round[1]
        if rnd.schedule is None:  # nothing kept this round: its steps change nothing (the optimizer sees no grads)
            return []
        batches = rnd.schedule.step(j)
        for b in batches:
            if rnd.ref is not None:
                b["ref_logps"] = rnd.ref[b["pair_index"]].reshape(-1)
            b["metrics"] = rnd.metrics
        return batches

    def build(self, r: int, step: int) -> Round:
        path = self.path(r)
        records = read_round(path) if path.exists() else self.draw(r, step)
        pairs, refs = [], []
        for rec in records:
            if rec["outcome"] == "kept":
                pairs.append(sampled_pair(rec["prompt_ids"], rec["chosen_ids"], rec["rejected_ids"],
                                          rec["prompt_index"], len(pairs)))
                refs.append(rec.get("ref_logps"))
        ref = torch.tensor(refs, dtype=torch.float64) if pairs and self.reference is not None else None
        if not path.exists():
            if ref is None and pairs and self.reference is not None:
                raise RuntimeError("reference log-probs missing")
            write_round(path, records)
        schedule = pair_schedule(pairs, micro_batch_size=self.micro, grad_accum=self.accum,
                                 seed=self.sampler.seed * 1_000_003 + r, pad_id=self.sampler.pad_id, packing=False,
                                 max_seq_len=self.max_seq_len, share_prompt=self.sampler.share_prompt) \
            if pairs else None
        metrics = {k: torch.tensor(v, dtype=torch.float64) for k, v in round_metrics(records).items()}
        metrics["online/round"] = torch.tensor(float(r), dtype=torch.float64)
        return Round(pairs, ref, schedule, metrics)

    def draw(self, r: int, step: int) -> list[dict[str, Any]]:
        """Sample, score and pick this round; reference log-probs of the kept pairs. Nothing is written yet."""
        s, k = self.sampler, self.k
        idx, ro = s.sample(r, k, **self.sampling)
        scores = s.score(self.reward, idx, k, ro) if self.reward is not None else None
        records = []
        for n, i in enumerate(idx):
            part = slice(n * k, (n + 1) * k)
            texts, ids = ro.texts[part], ro.completion_ids[part]
            pick = self.pick(i, texts, None if scores is None else scores[part])
            rec = {"round": r, "step": step, "prompt_index": i, "prompt": s.chats[i],
                   "scorer": self.scorer, "samples": texts, "scores": pick.scores,
                   "lengths": [len(c) for c in ids], "finished": [bool(f) for f in ro.finished[part]],
                   "outcome": pick.outcome, "chosen": pick.chosen, "rejected": pick.rejected,
                   "prompt_ids": list(ro.prompt_ids[n * k])}
            if pick.outcome == "kept":
                rec["chosen_ids"], rec["rejected_ids"] = list(ids[pick.chosen]), list(ids[pick.rejected])
            records.append(rec)
        kept = [rec for rec in records if rec["outcome"] == "kept"]
        if kept and self.reference is not None:
            pairs = [sampled_pair(x["prompt_ids"], x["chosen_ids"], x["rejected_ids"], x["prompt_index"], n)
                     for n, x in enumerate(kept)]
            table = reference_table(self.reference, s.model, pairs, self.micro, s.pad_id, s.share_prompt)
            for rec, row in zip(kept, table.tolist()):
                rec["ref_logps"] = row
        return records


def reference_table(reference: Reference, model: torch.nn.Module, pairs: list[Pair], batch_size: int, pad_id: int,
                    share_prompt: bool) -> torch.Tensor:
    """(pairs, 2) reference log-probs (chosen, rejected), laid out as the training batches are."""
    table = torch.full((len(pairs), 2), float("nan"), dtype=torch.float64)
    with torch.no_grad(), evaluating(model):
        for b in pair_batches(pairs, batch_size, pad_id, share_prompt):
            table[b["pair_index"]] = reference(model, b).double().cpu().reshape(-1, 2)
    return table


def write_round(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in records))


def read_round(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def batch_reference(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The reference log-probs a round computed for this batch's pairs (``OnlineRounds.step`` attaches them)."""
    return batch["ref_logps"].to(next(model.parameters()).device)


class OnlinePreference(PreferenceMethod):
    """``PreferenceMethod`` on a round's pairs, logging the round's statistics with each step."""

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = super().loss_sum(model, batch)
        metrics.update({k: float(v) for k, v in batch.get("metrics", {}).items()})
        return loss, metrics


def greedy_texts(model: torch.nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                 batch_size: int) -> Rollout:
    return sample_completions(model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens, temperature=0.0,
                              batch_size=batch_size)


def judge_eval(model: torch.nn.Module, tokenizer, prompts: list[list[int]], rows: list[dict[str, Any]],
               chats: list[Any], judge: Judge, criterion: str, baseline: list[str], *, margin: float,
               max_new_tokens: int, batch_size: int, watch: RewardFn | None = None) -> dict[str, float]:
    """Greedy answers to held-out prompts judged (both orders) against the starting policy's greedy answers
    (``baseline``): the win rate (a tie counts half, inconsistent verdicts are left out), the shares of wins,
    losses, ties and inconsistent verdicts, and the watch terms' means."""
    ro = greedy_texts(model, tokenizer, prompts, max_new_tokens, batch_size)
    verdicts = [both_orders(judge, prompt_text(c), new, old, criterion, margin=margin)
                for c, new, old in zip(chats, ro.texts, baseline, strict=True)]
    out = {f"eval/{k}": v for k, v in win_rate(verdicts).items() if k != "pairs"}
    out["eval/completion_len"] = sum(len(c) for c in ro.completion_ids) / max(len(prompts), 1)
    if watch is not None:
        out.update(mean_scores(watch, "eval/watch", chats, ro, rows))
    return out
