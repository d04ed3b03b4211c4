"""Collation: lists of examples, pairs or rollouts -> the tensor batches the methods train on.

Three layouts, one TypedDict each (the keys and their shapes):
- ``SFTBatch`` (``collate``): every row of a batch is a list of segments; positions restart at 0 in each segment.
  With no 2D attention mask, transformers builds a block-diagonal causal mask from those restarting position ids
  (for eager, SDPA and flash attention alike), so packed examples stay independent. Padding is one more segment
  with no loss. The tests check that a packed batch gives the same loss and gradients as the examples one by one.
- ``PairBatch`` (``collate_pairs``): a preference pair goes through the model in one forward, as one stretch of a
  row: its prompt once, then the chosen and the rejected response, each attending to the prompt and never to the
  other; several pairs can share a row (packing).
- ``UnpairedBatch`` (``collate_unpaired``): KTO's rows as two rollout layouts, each row's own prompt + completion
  and the mismatched prompt_i + completion_{order[i]} of its reference point (``order``: in KTO
  ``losses.kto.mismatched_order``, which the method passes; data does not import losses).
- ``RolloutBatch`` (``collate_rollouts``): a row holds ``prompt | completion 1 | ... | completion k`` for the
  completions of one prompt in a micro-batch; each completion's positions continue from the prompt, and
  ``branch``/``block`` (as in pair batches) let ``pair_attention_mask`` hide the completions from each other, so
  every completion sees exactly the tokens it would see alone. With ``share_prompt`` off each completion is a
  segment ``prompt + completion`` of its own (positions restart; no 4D mask, so flash attention works). The
  methods add per-token values (advantages, old and reference log-probs, ...) to these batches.

Shapes: B rows, T columns (the longest row); S scored tokens; P pairs; N completions, L the longest completion.
TypedDicts are plain dicts at runtime.

May import: posttrain.data.render, pairs, packing, unpaired.
"""

from __future__ import annotations

from typing import TypedDict

import torch

from posttrain.data.packing import best_fit, row_len, shared_prefix
from posttrain.data.pairs import Pair
from posttrain.data.render import Example
from posttrain.data.unpaired import Unpaired

IGNORE = -100
PAD_BRANCH = -1  # the branch of a rollout row's padding


class SFTBatch(TypedDict):
    input_ids: torch.Tensor  # (B, T) long; pad_id past each row's tokens
    labels: torch.Tensor  # (B, T) long; the token where trained, else IGNORE (also each segment's first token)
    position_ids: torch.Tensor  # (B, T) long; restart at 0 in every segment and in the padding
    num_tokens: torch.Tensor  # () long; non-padding tokens of the batch (for throughput)
    row_tokens: torch.Tensor  # (B,) long; each row's non-padding tokens, which sit at the row's start


class PairBatch(TypedDict):
    input_ids: torch.Tensor  # (B, T) long
    position_ids: torch.Tensor  # (B, T) long; a rejected response continues from the shared prompt
    branch: torch.Tensor  # (B, T) long; 0 shared prompt, 1 chosen, 2 rejected, 3 padding
    block: torch.Tensor  # (B, T) long; one id per pair (or per segment without a shared prompt), per padding run
    score_index: torch.Tensor  # (S,) long; flat row * T + t position whose hidden state predicts score_target
    score_target: torch.Tensor  # (S,) long; the scored token
    score_seq: torch.Tensor  # (S,) long; its sequence: 2k chosen, 2k + 1 rejected of pair k of the batch
    last_index: torch.Tensor  # (2P,) long; flat position of each sequence's last trained token
    num_tokens: torch.Tensor  # () long; non-padding tokens
    pair_index: torch.Tensor  # (P,) long; Pair.index of pair k (the key of precomputed reference log-probs)


class _RolloutLayout(TypedDict):
    input_ids: torch.Tensor  # (B, T) long
    position_ids: torch.Tensor  # (B, T) long; a completion's positions continue from its prompt
    branch: torch.Tensor  # (B, T) long; 0 shared prompt, k + 1 the row's k-th completion, PAD_BRANCH padding
    block: torch.Tensor  # (B, T) long; one id per row (per completion without a shared prompt), per padding run
    score_index: torch.Tensor  # (S,) long; flat row * T + t position whose hidden state predicts score_target
    score_target: torch.Tensor  # (S,) long; every completion token
    score_seq: torch.Tensor  # (S,) long; its completion, 0..N-1
    score_pos: torch.Tensor  # (S,) long; its position in that completion, 0..L-1
    completion_mask: torch.Tensor  # (N, L) bool; which entries of the per-token (N, L) tensors are real
    last_index: torch.Tensor  # (N,) long; flat position of each completion's last token (a reward model's score)
    num_tokens: torch.Tensor  # () long; non-padding tokens


class RolloutBatch(_RolloutLayout, total=False):
    """What ``collate_rollouts`` lays out, plus what the RL methods add before training on it (each key only
    where its method needs it), and the rollout's metrics to log in a field of their own."""
    advantages: torch.Tensor  # float; (N,) per completion (GRPO's group advantages) or (N, L) per token (PPO's GAE)
    old_logp: torch.Tensor  # (N, L) float; log-probs under the sampling policy (GRPO with mu > 1, PPO)
    ref_logp: torch.Tensor  # (N, L) float; log-probs under the reference (GRPO with a KL term)
    engine_logp: torch.Tensor  # (N, L) float; the rollout engine's log-probs of the sampled tokens (0 on padding)
    old_values: torch.Tensor  # (N, L) float; the value head at rollout time (PPO)
    returns: torch.Tensor  # (N, L) float; GAE returns, the value targets (PPO)
    metrics: dict[str, torch.Tensor]  # name -> 0-d float; the rollout's reward, lengths, watch terms (logged per step)


def collate(rows: list[list[Example]], pad_id: int, pad_to: int | None = None) -> SFTBatch:
    """Batch rows of segments: ``input_ids``, ``labels`` (IGNORE where untrained) and ``position_ids``, all (B, T),
    plus ``num_tokens``, the count of non-padding tokens (for throughput), and ``row_tokens`` (B,), each row's
    non-padding tokens, which sit at the row's start."""
    width = max(sum(len(e) for e in row) for row in rows)
    width = max(width, pad_to or 0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex)
            t = torch.tensor(ex.input_ids, dtype=torch.long)
            ids[r, at:at + n] = t
            mask = torch.tensor(ex.trained, dtype=torch.bool)
            mask[0] = False  # a segment's first token must not be predicted from the previous segment
            labels[r, at:at + n] = torch.where(mask, t, IGNORE)
            pos[r, at:at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(width - at)  # padding: its own segment
    row_tokens = torch.tensor([sum(len(e) for e in row) for row in rows])
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "num_tokens": row_tokens.sum(),
            "row_tokens": row_tokens}


def num_targets(batch: SFTBatch) -> int:
    """Trained tokens in a batch: the normaliser of the token-mean loss."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def eval_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[SFTBatch]:
    """Held-out batches in file order, unpacked (sorted by length to waste little padding)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    return [collate([[examples[i]] for i in order[k:k + batch_size]], pad_id) for k in range(0, len(order), batch_size)]


def pad_branch_rows(rows: list[tuple[list[int], list[int], list[int], list[int]]], pad_id: int, *, pad_branch: int,
                    next_block: int) -> dict[str, torch.Tensor]:
    """(B, T) ``input_ids``, ``position_ids``, ``branch``, ``block`` from rows of (ids, positions, branch, block);
    each row's padding is a segment of its own (positions from 0, branch ``pad_branch``, a fresh block id)."""
    width = max(len(r[0]) for r in rows)
    out = {"input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
           "position_ids": torch.zeros((len(rows), width), dtype=torch.long),
           "branch": torch.full((len(rows), width), pad_branch, dtype=torch.long),
           "block": torch.zeros((len(rows), width), dtype=torch.long)}
    for b, (ids, pos, branch, blocks) in enumerate(rows):
        n = len(ids)
        out["input_ids"][b, :n] = torch.tensor(ids)
        out["position_ids"][b, :n] = torch.tensor(pos)
        out["position_ids"][b, n:] = torch.arange(width - n)
        out["branch"][b, :n] = torch.tensor(branch)
        out["block"][b, :n] = torch.tensor(blocks)
        out["block"][b, n:] = next_block + b
    return out


def collate_pairs(units: list[list[Pair]], pad_id: int, share_prompt: bool = True) -> PairBatch:
    """One row per unit; pair k of the batch (``pair_index[k]``) owns sequences 2k (chosen) and 2k+1 (rejected).

    With ``share_prompt`` a pair is laid out once as ``prompt | chosen response | rejected response``: the rejected
    response sits at the positions it would have after the prompt, and ``branch`` (0 prompt, 1 chosen,
    2 rejected, 3 padding) with ``block`` (one id per pair, per padding run) let ``pair_attention_mask`` hide the
    chosen response from it, so the prompt goes through the model once instead of twice with the same
    result. Without it, chosen and rejected are two segments whose positions restart, the layout of plain packing.

    Scored tokens are listed explicitly, because with a shared prompt the first token of the rejected response is
    predicted from the prompt's last token, not from its left neighbour: ``score_index`` is the flat (row * T + t)
    position whose hidden state predicts ``score_target``, ``score_seq`` its sequence; ``last_index`` is each
    sequence's last trained token (where a reward model reads its score).
    """
    rows: list[tuple[list[int], list[int], list[int], list[int]]] = []  # ids, positions, branch, block
    src: list[int] = []
    tgt: list[int] = []
    seq: list[int] = []
    last: list[int] = []
    src_row: list[int] = []
    last_row: list[int] = []
    block = 0
    for unit in units:
        ids: list[int] = []
        pos: list[int] = []
        branch: list[int] = []
        blocks: list[int] = []
        for p in unit:
            c, r = p.chosen, p.rejected
            shared = shared_prefix(c, r) if share_prompt else 0
            base = len(ids)
            tail = base + len(c) - shared  # where the rejected response's own tokens start in the row
            n_seq = len(last)
            for j in range(1, len(c)):
                if c.trained[j]:
                    src.append(base + j - 1)
                    tgt.append(c.input_ids[j])
                    seq.append(n_seq)
            for j in range(1, len(r)):
                if r.trained[j]:
                    src.append(base + j - 1 if j - 1 < shared else tail + j - 1)
                    tgt.append(r.input_ids[j])
                    seq.append(n_seq + 1)
            last.append(base + max(j for j, on in enumerate(c.trained) if on))
            last.append(tail + max(j for j, on in enumerate(r.trained) if on))
            ids += c.input_ids + r.input_ids[shared:]
            pos += list(range(len(c))) + list(range(shared, len(r)))
            branch += [0] * shared + [1] * (len(c) - shared) + [2] * (len(r) - shared)
            if shared:
                blocks += [block] * (len(c) + len(r) - shared)
                block += 1
            else:  # two independent segments
                blocks += [block] * len(c) + [block + 1] * len(r)
                block += 2
        rows.append((ids, pos, branch, blocks))
        src_row += [len(rows) - 1] * (len(src) - len(src_row))
        last_row += [len(rows) - 1] * (len(last) - len(last_row))
    out = pad_branch_rows(rows, pad_id, pad_branch=3, next_block=block)
    width = out["input_ids"].shape[1]
    out.update(score_index=torch.tensor(src) + width * torch.tensor(src_row), score_target=torch.tensor(tgt),
               score_seq=torch.tensor(seq), last_index=torch.tensor(last) + width * torch.tensor(last_row))
    out["num_tokens"] = torch.tensor(sum(len(r[0]) for r in rows))
    out["pair_index"] = torch.tensor([p.index for unit in units for p in unit], dtype=torch.long)
    return out


def pair_batches(pairs: list[Pair], batch_size: int, pad_id: int, share_prompt: bool = True,
                 max_seq_len: int | None = None) -> list[PairBatch]:
    """Fixed batches for evaluation and reference precomputation. With ``max_seq_len``, pairs are packed into rows
    of up to ``2 * max_seq_len`` tokens (no padding to speak of), ``batch_size`` rows a batch; without, one pair per
    row in length order."""
    lengths = [row_len(p, share_prompt) for p in pairs]
    if max_seq_len:
        rows = [[pairs[i] for i in b] for b in best_fit(lengths, max(2 * max_seq_len, max(lengths, default=0)))]
    else:
        rows = [[pairs[i]] for i in sorted(range(len(pairs)), key=lambda i: lengths[i])]
    return [collate_pairs(rows[k:k + batch_size], pad_id, share_prompt) for k in range(0, len(rows), batch_size)]


def collate_rollouts(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                     share_prompt: bool = True) -> RolloutBatch:
    """Completions in order; consecutive completions with the same prompt (the same list object or equal ids)
    share one copy of it when ``share_prompt``."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(completion_ids)} completions")
    if any(not c for c in completion_ids):
        raise ValueError("a completion has no tokens")
    groups: list[list[int]] = []  # completion indices per row
    for i, p in enumerate(prompt_ids):
        if share_prompt and groups and prompt_ids[groups[-1][0]] == p:
            groups[-1].append(i)
        else:
            groups.append([i])
    rows = []
    src, tgt, seq, tok = [], [], [], []
    src_row: list[int] = []
    last: list[tuple[int, int]] = [(0, 0)] * len(completion_ids)  # (row, column) of each completion's last token
    block = 0
    for r, members in enumerate(groups):
        ids, pos, branch, blocks = [], [], [], []
        for k, i in enumerate(members):
            p, c = prompt_ids[i], completion_ids[i]
            if k == 0 or not share_prompt:
                ids += p
                pos += list(range(len(p)))
                branch += [0 if share_prompt else 1] * len(p)
                blocks += [block] * len(p)
                prompt_end = len(ids) - 1  # predicts every completion's first token
            start = len(ids)
            for j, t in enumerate(c):
                src.append(prompt_end if j == 0 else start + j - 1)
                tgt.append(t)
                seq.append(i)
                tok.append(j)
            ids += c
            last[i] = (r, len(ids) - 1)
            pos += list(range(len(p), len(p) + len(c)))
            branch += [k + 1] * len(c)
            blocks += [block] * len(c)
            if not share_prompt:
                block += 1
        block += 1 if share_prompt else 0
        rows.append((ids, pos, branch, blocks))
        src_row += [r] * (len(src) - len(src_row))
    out = pad_branch_rows(rows, pad_id, pad_branch=PAD_BRANCH, next_block=block)
    width = out["input_ids"].shape[1]
    longest = max(len(c) for c in completion_ids)
    mask = torch.zeros((len(completion_ids), longest), dtype=torch.bool)
    for i, c in enumerate(completion_ids):
        mask[i, :len(c)] = True
    out.update(score_index=torch.tensor(src) + width * torch.tensor(src_row), score_target=torch.tensor(tgt),
               score_seq=torch.tensor(seq), score_pos=torch.tensor(tok), completion_mask=mask,
               last_index=torch.tensor([r * width + t for r, t in last]),
               num_tokens=torch.tensor(sum(len(r[0]) for r in rows)))
    return out


class UnpairedBatch(TypedDict):
    own: RolloutBatch  # completion i is row i's own: prompt_i + completion_i
    mismatched: RolloutBatch  # completion i is prompt_i + completion_{order[i]}, cut to max_seq_len
    desirable: torch.Tensor  # (N,) bool; row i's label
    row_index: torch.Tensor  # (N,) long; Unpaired.index of row i
    num_tokens: torch.Tensor  # () long; non-padding tokens of both layouts


def collate_unpaired(rows: list[Unpaired], order: list[int], pad_id: int,
                     max_seq_len: int | None = None) -> UnpairedBatch:
    """KTO's micro-batch: each row once as its own sequence and once with its prompt before row ``order[i]``'s
    completion (the reference point's mismatched pairs). A mismatched sequence is cut to ``max_seq_len`` tokens,
    keeping at least one completion token, so a long prompt followed by another row's long completion cannot make
    the micro-batch twice as long as its own rows."""
    if sorted(order) != list(range(len(rows))):
        raise ValueError(f"order must be a permutation of the {len(rows)} rows, got {order}")
    prompts = [r.prompt_ids for r in rows]
    swapped = [rows[j].completion_ids for j in order]
    if max_seq_len is not None:
        swapped = [c[:max(1, max_seq_len - len(p))] for p, c in zip(prompts, swapped)]
    own = collate_rollouts(prompts, [r.completion_ids for r in rows], pad_id, share_prompt=False)
    mismatched = collate_rollouts(prompts, swapped, pad_id, share_prompt=False)
    return {"own": own, "mismatched": mismatched,
            "desirable": torch.tensor([r.label for r in rows], dtype=torch.bool),
            "row_index": torch.tensor([r.index for r in rows], dtype=torch.long),
            "num_tokens": own["num_tokens"] + mismatched["num_tokens"]}
