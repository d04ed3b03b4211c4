"""Per-token logprobs: the distribution they are read from, computed only for the rows that ask, and vLLM's wire
shapes for them on /v1/completions and /v1/chat/completions.

Which distribution is the server's ``--logprobs-mode`` (vLLM's flag and values):

- ``raw_logprobs`` (the default, as vLLM's): log_softmax of the model's logits, before anything sampling does to
  them: what a teacher-forced forward of prompt + completion gives.
- ``processed_logprobs``: log_softmax(logits / temperature) (temperature 0: the logits as they are), after the
  min_tokens mask (a stop token held back reads -9999.0, as in vLLM, whose processed values follow its logits
  processors).

top_p is applied to neither: a token outside the nucleus still gets its value from the full distribution. (vLLM's
processed mode reads the values after its top-k/top-p masks, so there a token outside the nucleus reads -9999.0.)

Every sampled token is listed, the stop token (EOS, end of turn) included when it ended the choice (vLLM appends the
token before its stop check, so its ids and logprobs hold it; the text does not), and for a stop string, the tokens
up to and including the one that completed it. Token strings are each token decoded alone (vLLM's
``convert_ids_list_to_tokens``): a token holding part of a multi-byte character reads U+FFFD.
"""

from __future__ import annotations

import torch

RAW, PROCESSED = "raw_logprobs", "processed_logprobs"
MODES = (RAW, PROCESSED)
FLOOR = -9999.0  # vLLM's and OpenAI's stand-in for -inf, which JSON cannot carry

# One sampled token: (its id, its logprob, the k most probable (id, logprob) in rank order).
Step = tuple[int, float, tuple[tuple[int, float], ...]]


def distribution(logits: torch.Tensor, temperatures: list[float], mode: str) -> torch.Tensor:
    """``(R, V)`` log-probabilities of ``(R, V)`` logits, one row per row that asked, in ``mode``."""
    if mode == PROCESSED:
        scale = torch.tensor([t if t > 0 else 1.0 for t in temperatures], device=logits.device)
        logits = logits / scale[:, None]
    return torch.log_softmax(logits.float(), dim=-1)


def steps(logp: torch.Tensor, tokens: list[int], ks: list[int]) -> list[Step]:
    """Each row's sampled token with its logprob and its row's ``k`` best alternatives (one top-k for all rows,
    at the largest k asked, then cut per row)."""
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    widest = max(ks)
    values, ids = logp.topk(widest, dim=-1) if widest else (logp[:, :0], logp[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    return [(t, lp, tuple(zip(ids[i][:k], values[i][:k]))) for i, (t, lp, k) in enumerate(zip(tokens, chosen, ks))]


def _ranked(step: Step) -> list[tuple[int, float]]:
    """vLLM's per-position entries: the sampled token first, then the top-k in rank order without repeating it
    (at most k + 1 entries; k when the sampled token is among the top k)."""
    token, lp, top = step
    entries = {token: lp}
    for i, v in top:
        entries.setdefault(i, v)
    return list(entries.items())


class _Names:
    """Token strings: each token decoded alone, or ``token_id:{id}`` (vLLM's return_tokens_as_token_ids)."""

    def __init__(self, tokenizer, as_ids: bool):
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def __call__(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.text(token_id)


def completion_logprobs(steps_: list[Step], tokenizer, as_ids: bool) -> dict:
    """A completion choice's ``logprobs``: parallel lists, ``top_logprobs`` a {token: logprob} dict per position
    holding the sampled token and the k best (so at k = 0 just the sampled token, as vLLM returns). ``text_offset``
    adds up the listed token strings' lengths, as vLLM does (so with token ids on, the lengths of "token_id:N")."""
    name = _Names(tokenizer, as_ids)
    out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    offset = 0
    for step in steps_:
        token = name(step[0])
        out["text_offset"].append(offset)
        out["token_logprobs"].append(max(step[1], FLOOR))
        out["tokens"].append(token)
        out["top_logprobs"].append({name(i): max(v, FLOOR) for i, v in _ranked(step)})
        offset += len(token)
    return out


def chat_logprobs(steps_: list[Step], tokenizer, k: int, as_ids: bool) -> dict:
    """A chat choice's ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``, ``top_logprobs`` the
    first k of vLLM's entries (the sampled token first). As in vLLM, a position's ``bytes`` are its decoded text's
    UTF-8 bytes, while an alternative's are those of its token string as written (``token_id:N`` with ids on)."""
    name = _Names(tokenizer, as_ids)
    content = []
    for step in steps_:
        top = []
        for i, v in _ranked(step)[:k]:
            token = name(i)
            top.append({"token": token, "logprob": max(v, FLOOR), "bytes": list(token.encode("utf-8", "replace"))})
        content.append({"token": name(step[0]), "logprob": max(step[1], FLOOR),
                        "bytes": list(name.text(step[0]).encode("utf-8", "replace")), "top_logprobs": top})
    return {"content": content}
