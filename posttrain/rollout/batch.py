"""Rollout batches: completions laid out with their prompt run once, and per-token values read from one forward.

A row holds ``prompt | completion 1 | ... | completion k`` for the completions of one prompt in a micro-batch;
each completion's positions continue from the prompt, and ``branch``/``block`` (as in preference batches) let
``pair_attention_mask`` hide the completions from each other, so every completion sees exactly the tokens it
would see alone. With G = 8 samples of a ~100-token prompt this feeds ~870 positions instead of ~1600. With
``share_prompt`` off each completion is a segment ``prompt + completion`` of its own (positions restart; no 4D
mask, so flash attention works).

Per-token outputs are (N, L) tensors, N completions by L = the longest completion, zero past each completion's
end; ``completion_mask`` says which entries are real. ``score_index`` is the flat (row * T + t) position whose
hidden state predicts completion token ``score_pos`` of completion ``score_seq``; ``last_index`` is the flat
position of each completion's last token (where a reward model reads its score).
"""

from __future__ import annotations

import torch

from posttrain.data.preference import pad_branch_rows
from posttrain.losses import target_logps
from posttrain.methods.preference import pair_hidden
from posttrain.methods.sft import _plain_head, unwrap

Batch = dict[str, torch.Tensor]
PAD_BRANCH = -1


def collate_rollouts(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                     share_prompt: bool = True) -> Batch:
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


def scatter_tokens(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Flat per-scored-token values -> (N, L), zero outside each completion."""
    mask = batch["completion_mask"]
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[batch["score_seq"].to(values.device), batch["score_pos"].to(values.device)] = values
    return out


def rollout_logps(model: torch.nn.Module, batch: Batch, temperature: float = 1.0,
                  chunk_size: int = 1024) -> torch.Tensor:
    """(N, L) log-probs of the sampled tokens under logits / temperature (the distribution they were sampled
    from); the LM head runs only on completion positions, a chunk at a time."""
    inner = unwrap(model)
    head = _plain_head(inner)
    device = next(inner.parameters()).device
    src, tgt = batch["score_index"].to(device), batch["score_target"].to(device)
    up = torch.promote_types(next(inner.parameters()).dtype, torch.float32)
    if head is None:
        logits = pair_hidden(model, batch, decoder_only=False)[src]
        logp = torch.log_softmax(logits.to(up) / temperature, -1).gather(1, tgt[:, None])[:, 0]
    else:
        logp = target_logps(pair_hidden(model, batch, decoder_only=True)[src], head.weight, tgt, chunk_size, up,
                            temperature)
    return scatter_tokens(logp, batch)
