"""Preference pairs: read, validate, render chosen and rejected with a response-only mask, batch them.

Row formats (picked per row):
- ``prompt`` / ``chosen`` / ``rejected``: the prompt is text or a list of chat messages (it may be multi-turn and
  must end with a user turn); each response is text or a list of assistant messages.
- ``chosen`` / ``rejected`` only, as full conversations: Anthropic HH text (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``)
  or message lists. Both must share the dialogue up to the last assistant turn, which becomes the prompt.

A message's content is text or a list of OpenAI text parts (joined as ``formats.content_text`` says).

Only the final response carries the preference, so only its tokens (and its end-of-turn) are scored, even when
the prompt holds earlier assistant turns. A pair goes through the model in one forward, as one stretch of a row:
its prompt once, then the chosen and the rejected response, each attending to the prompt and never to the other
(see ``collate_pairs``); several pairs can share a row (packing).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.data.dataset import BatchPlan
from posttrain.data.formats import Messages, content_text, validate_messages
from posttrain.data.packing import best_fit
from posttrain.data.readers import read_rows
from posttrain.data.render import Example, render_example
from posttrain.errors import BadPair, DataError, TemplateError


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    prompt: Messages
    row: int
    index: int = 0  # position in its dataset: the key of precomputed reference log-probs

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def parse_hh(text: str, file: str, num: int, fld: str) -> Messages:
    """``"\\n\\nHuman: a\\n\\nAssistant: b ..."`` -> chat messages.

    The released HH data has a few dialogues where one speaker has two turns in a row; they are joined into one
    turn (nothing is dropped), since chat templates need alternating roles.
    """
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(file, num, fld, "not in the HH format: expected '\\n\\nHuman: ...\\n\\nAssistant: ...'")
    roles = {"Human": "user", "Assistant": "assistant"}
    out: Messages = []
    for who, said in zip(parts[1::2], parts[2::2]):
        if out and out[-1]["role"] == roles[who]:
            out[-1]["content"] += "\n\n" + said.strip()
        else:
            out.append({"role": roles[who], "content": said.strip()})
    return out


def _conversation(value: Any, file: str, num: int, fld: str) -> Messages:
    if isinstance(value, str):
        return parse_hh(value, file, num, fld)
    if isinstance(value, list):
        if not value:
            raise BadPair(file, num, fld, "is empty")
        return _plain(value, file, num, fld)
    raise DataError(file, num, fld, f"expected text or a list of messages, got {type(value).__name__}")


def _plain(messages: list, file: str, num: int, fld: str) -> list:
    """Copies of the messages with content parts joined into text, so that chosen and rejected compare by what
    they say; the rest is left to validate_messages."""
    return [{**m, "content": content_text(m["content"], file, num, f"{fld}[{i}].content")}
            if isinstance(m, dict) and "content" in m else m for i, m in enumerate(messages)]


def _response(value: Any, file: str, num: int, fld: str) -> Messages:
    if isinstance(value, str):
        if not value.strip():
            raise BadPair(file, num, fld, "empty response")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list) and value:
        for i, m in enumerate(value):
            if not isinstance(m, dict) or m.get("role") != "assistant":
                raise DataError(file, num, f"{fld}[{i}]", "a response list holds only assistant messages")
            if "content" not in m:
                raise DataError(file, num, f"{fld}[{i}].content", "missing field")
        value = _plain(value, file, num, fld)
        for i, m in enumerate(value):
            if not m["content"].strip():
                raise BadPair(file, num, f"{fld}[{i}].content", "empty response")
        return [{"role": "assistant", "content": m["content"]} for m in value]
    if isinstance(value, list):
        raise BadPair(file, num, fld, "empty response")
    raise DataError(file, num, fld, f"expected text or a list of assistant messages, got {type(value).__name__}")


def row_to_pair(row: dict[str, Any], file: str, num: int,
                system_prompt: str | None = None) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen response, rejected response) as messages, validated; raises DataError / BadPair."""
    for fld in ("chosen", "rejected"):
        if row.get(fld) is None:
            raise DataError(file, num, fld, "missing field")
    if row.get("prompt") is not None:
        prompt_raw = row["prompt"]
        if isinstance(prompt_raw, str):
            prompt = [{"role": "user", "content": prompt_raw}]
        elif isinstance(prompt_raw, list):
            prompt = _plain(prompt_raw, file, num, "prompt")
        else:
            raise DataError(file, num, "prompt", f"expected text or a list of messages, got {type(prompt_raw).__name__}")
        chosen = _response(row["chosen"], file, num, "chosen")
        rejected = _response(row["rejected"], file, num, "rejected")
    else:
        c = _conversation(row["chosen"], file, num, "chosen")
        r = _conversation(row["rejected"], file, num, "rejected")
        if not c or c[-1].get("role") != "assistant" or not r or r[-1].get("role") != "assistant":
            raise BadPair(file, num, "chosen" if not c or c[-1].get("role") != "assistant" else "rejected",
                          "must end with an assistant turn")
        if c[:-1] != r[:-1]:
            raise BadPair(file, num, "rejected", "chosen and rejected do not share the dialogue before their last "
                          "assistant turn, so there is no common prompt")
        prompt, chosen, rejected = c[:-1], c[-1:], r[-1:]
        for fld, resp in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(resp[0].get("content"), str) or not resp[0]["content"].strip():
                raise BadPair(file, num, fld, "empty response")
    if system_prompt and (not prompt or not isinstance(prompt[0], dict) or prompt[0].get("role") != "system"):
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    # Full-chat validation gives the role-order and content errors their row, field and wording, and the
    # normalised {role, content} messages returned.
    full_chosen = validate_messages(prompt + chosen, file, num, "prompt+chosen")
    full_rejected = validate_messages(prompt + rejected, file, num, "prompt+rejected")
    prompt, chosen, rejected = full_chosen[:len(prompt)], full_chosen[len(prompt):], full_rejected[len(prompt):]
    if [m["content"].strip() for m in chosen] == [m["content"].strip() for m in rejected]:
        raise BadPair(file, num, "rejected", "identical to chosen: the pair carries no preference")
    return prompt, chosen, rejected


def render_response(tokenizer, prompt: Messages, response: Messages, chat_template: str | None = None) -> Example:
    """The chat rendered with only its final assistant turn trained (the last contiguous run of trained tokens)."""
    ex = render_example(tokenizer, prompt + response, chat_template)
    last = max((t for t, on in enumerate(ex.trained) if on), default=None)
    if last is None:
        raise TemplateError("the response renders to no token")
    first = last
    while first > 0 and ex.trained[first - 1]:
        first -= 1
    ex.trained = [first <= t <= last for t in range(len(ex.trained))]
    return ex


@dataclass
class PairReport:
    file: str
    rows: int = 0
    kept: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)
    dropped_overlong: list[int] = field(default_factory=list)
    tokens: int = 0

    def summary(self) -> str:
        parts = [f"{self.file}: {self.rows} pairs, {self.kept} kept, {self.tokens} tokens"]
        if self.bad:
            shown = "; ".join(f"row {n}: {why}" for n, why in self.bad[:3])
            more = f"; ... +{len(self.bad) - 3}" if len(self.bad) > 3 else ""
            parts.append(f"{len(self.bad)} bad pairs dropped ({shown}{more})")
        if self.truncated:
            parts.append(f"{len(self.truncated)} truncated")
        if self.dropped_overlong:
            parts.append(f"{len(self.dropped_overlong)} dropped as over-long")
        return "; ".join(parts)


def build_pairs(path: str, tokenizer, *, max_seq_len: int, overlong: str = "error", bad_pairs: str = "error",
                system_prompt: str | None = None, chat_template: str | None = None,
                limit: int | None = None) -> tuple[list[Pair], PairReport]:
    """Validate every row first (so a bad row stops the run before any tokenising), then render the pairs."""
    rows = read_rows(path)[:limit] if limit else read_rows(path)
    report = PairReport(file=path, rows=len(rows))
    parsed = []
    for num, row in rows:
        try:
            parsed.append((num, *row_to_pair(row, path, num, system_prompt)))
        except BadPair as exc:
            if bad_pairs == "error":
                raise DataError(path, num, exc.field, exc.problem + " (data.bad_pairs: drop skips such pairs)") from None
            report.bad.append((num, exc.problem))
    pairs: list[Pair] = []
    for num, prompt, chosen, rejected in parsed:
        try:
            c = render_response(tokenizer, prompt, chosen, chat_template)
            r = render_response(tokenizer, prompt, rejected, chat_template)
        except TemplateError as exc:
            raise DataError(path, num, None, str(exc)) from None
        if max(len(c), len(r)) > max_seq_len:
            if overlong == "error":
                raise DataError(path, num, None, f"{max(len(c), len(r))} tokens, more than data.max_seq_len="
                                f"{max_seq_len}; raise it or set data.overlong to 'truncate' or 'drop'")
            if overlong == "drop":
                report.dropped_overlong.append(num)
                continue
            for ex in (c, r):  # keep the prompt, cut the end of the response
                ex.input_ids, ex.trained = ex.input_ids[:max_seq_len], ex.trained[:max_seq_len]
            if not (c.num_trained and r.num_trained):
                raise DataError(path, num, None, f"the prompt alone fills data.max_seq_len={max_seq_len}")
            report.truncated.append(num)
        for ex in (c, r):
            ex.row, ex.source = num, path
        pairs.append(Pair(c, r, prompt, num, index=len(pairs)))
        report.tokens += len(c) + len(r)
    report.kept = len(pairs)
    if not pairs:
        raise DataError(path, None, None, "no pair is left to train on (see the bad-pair and over-long policies)")
    return pairs, report


def shared_prefix(c: Example, r: Example) -> int:
    """Leading tokens chosen and rejected have in common before either response starts: the rendered prompt."""
    limit = min(c.trained.index(True), r.trained.index(True))
    n = 0
    while n < limit and c.input_ids[n] == r.input_ids[n]:
        n += 1
    return n


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


def collate_pairs(units: list[list[Pair]], pad_id: int, share_prompt: bool = True) -> dict[str, torch.Tensor]:
    """One row per unit; pair k of the batch (``pair_index[k]``) owns sequences 2k (chosen) and 2k+1 (rejected).

    With ``share_prompt`` a pair is laid out once as ``prompt | chosen response | rejected response``: the rejected
    response sits at the positions it would have after the prompt, and ``branch`` (0 prompt, 1 chosen,
    2 rejected, 3 padding) with ``block`` (one id per pair, per padding run) let ``pair_attention_mask`` hide the
    chosen response from it, so the prompt goes through the model once instead of twice with the same result. Without it, chosen and
    rejected are two segments whose positions restart, the layout of plain packing.

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


def row_len(p: Pair, share_prompt: bool) -> int:
    """Tokens a pair takes in a batch row."""
    return len(p) - (shared_prefix(p.chosen, p.rejected) if share_prompt else 0)


class PairPlan(BatchPlan):
    """Deterministic batches of pairs by optimizer step, as BatchPlan; with packing, several pairs share a row of
    up to ``2 * max_seq_len`` tokens. Without packing a micro-batch holds ``micro_batch_size`` pairs, but it is
    still laid out padding-free: its pairs fill as few rows of that size as they fit in, so no pair is padded to
    the longest one (the loss is the same either way; only the padding goes)."""

    def __init__(self, pairs: list[Pair], *, micro_batch_size: int, grad_accum: int, seed: int, pad_id: int,
                 packing: bool, max_seq_len: int, share_prompt: bool = True, world_size: int = 1, rank: int = 0):
        super().__init__([], micro_batch_size=micro_batch_size, grad_accum=grad_accum, seed=seed, pad_id=pad_id,
                         packing=False, max_seq_len=max_seq_len, world_size=world_size, rank=rank)
        self.share_prompt, self.packed, self.row_cap = share_prompt, packing, 2 * max_seq_len
        if packing:
            lengths = [row_len(p, share_prompt) for p in pairs]
            self.units = [[pairs[i] for i in b] for b in best_fit(lengths, self.row_cap)]
        else:
            self.units = [[p] for p in pairs]
        self.unit_name = "packed rows" if packing else "pairs"

    def _collate(self, units: list) -> dict[str, torch.Tensor]:
        if not self.packed:
            pairs = [p for unit in units for p in unit]
            lengths = [row_len(p, self.share_prompt) for p in pairs]
            units = [[pairs[i] for i in b] for b in best_fit(lengths, max(self.row_cap, *lengths))]
        return collate_pairs(units, self.pad_id, self.share_prompt)


def pair_batches(pairs: list[Pair], batch_size: int, pad_id: int, share_prompt: bool = True,
                 max_seq_len: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Fixed batches for evaluation and reference precomputation. With ``max_seq_len``, pairs are packed into rows
    of up to ``2 * max_seq_len`` tokens (no padding to speak of), ``batch_size`` rows a batch; without, one pair per
    row in length order."""
    lengths = [row_len(p, share_prompt) for p in pairs]
    if max_seq_len:
        rows = [[pairs[i] for i in b] for b in best_fit(lengths, max(2 * max_seq_len, max(lengths, default=0)))]
    else:
        rows = [[pairs[i]] for i in sorted(range(len(pairs)), key=lambda i: lengths[i])]
    return [collate_pairs(rows[k:k + batch_size], pad_id, share_prompt) for k in range(0, len(rows), batch_size)]
