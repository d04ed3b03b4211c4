"""Rewards for reasoning completions in the thinking format: ``<think>...</think>`` first, then the answer.

``strip_think`` is the answer a verifier should read (``gsm8k_answer`` and ``regex`` take ``after_think``), so a
number worked out inside the thinking never counts as the answer. ``think_format`` checks the shape and
``think_budget`` is DAPO's soft length punishment on the thinking's tokens alone. The tags must survive decoding:
rollouts decode with ``skip_special_tokens``, so a tokenizer that marks ``<think>`` as a special token drops it
from the text. When the chat template's generation prompt already opens the block (DeepSeek-R1's does), set
``open: ""``: the completion then starts inside the thinking.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from posttrain.models import load_tokenizer

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _check_tags(open: str, close: str) -> None:
    if not close:
        raise ValueError("the thinking format needs a non-empty closing tag (option close)")
    if open == close:
        raise ValueError(f"the opening and closing tags must differ, both are {close!r}")


def strip_think(text: str, open: str = THINK_OPEN, close: str = THINK_CLOSE) -> str:
    """The answer part of a completion: the text after the last closing tag; the whole text when there is no
    block; "" for an unclosed block (the completion stopped while thinking, so it gave no answer)."""
    _check_tags(open, close)
    _, sep, tail = text.rpartition(close)
    if sep:
        return tail
    return "" if open in text else text  # "" is in every text: with open "" no close means still thinking


def think_format(prompts: Sequence[Any], completions: Sequence[str], open: str = THINK_OPEN,
                 close: str = THINK_CLOSE, **row: Any) -> list[float]:
    """1.0 for a completion that is exactly one thinking block with something in it, then a non-empty answer
    (surrounding whitespace aside); 0 for an unclosed block, a second block, a missing answer, or text before
    the block."""
    _check_tags(open, close)
    out = []
    for c in completions:
        text = c.strip()
        inner = text[len(open):] if text.startswith(open) else None
        if inner is None or (open and open in inner):
            out.append(0.0)
            continue
        think, sep, answer = inner.partition(close)
        ok = sep and think.strip() and answer.strip() and close not in answer
        out.append(float(bool(ok)))
    return out


def soft_overlong(lengths: Sequence[int], max_tokens: int | None, cache: int | None, name: str) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of each length in tokens: 0 up to
    ``max_tokens - cache``, then ((max_tokens - cache) - len) / cache falling linearly to -1 at ``max_tokens``,
    and -1 beyond. ``cache`` defaults to a fifth of ``max_tokens``, DAPO's 4096 of 20480. ``name`` is the reward
    named in errors (``overlong`` on the whole completion, ``think_budget`` on the thinking)."""
    if not max_tokens or max_tokens <= 0:
        raise ValueError(f"the {name} reward needs options: {{max_tokens: <the budget in tokens>}}")
    cache = max(1, max_tokens // 5) if cache is None else cache
    if not 0 < cache <= max_tokens:
        raise ValueError(f"{name}: cache must be in 1..max_tokens ({max_tokens}), got {cache}")
    soft = max_tokens - cache
    return [0.0 if n <= soft else (soft - n) / cache if n <= max_tokens else -1.0 for n in lengths]


@functools.lru_cache(maxsize=4)
def _load_tokenizer(name: str):
    return load_tokenizer(name)


def think_tokens(completion: str, total: int, tokenizer, open: str = THINK_OPEN, close: str = THINK_CLOSE) -> int:
    """Tokens of a completion's thinking. An unclosed block is the whole completion: ``total``, its generated
    length, exactly. A closed one is the text up to the last closing tag re-tokenised, which can differ from the
    generated ids by a token where the model emitted a non-canonical split; capped at ``total``. No block: 0."""
    head, sep, _ = completion.rpartition(close)
    if not sep:
        return total if open in completion else 0
    return min(total, len(tokenizer(head + sep, add_special_tokens=False)["input_ids"]))


def think_budget(prompts: Sequence[Any], completions: Sequence[str], completion_tokens: Sequence[int] | None = None,
                 max_tokens: int | None = None, cache: int | None = None, tokenizer: str | None = None,
                 open: str = THINK_OPEN, close: str = THINK_CLOSE, **row: Any) -> list[float]:
    """DAPO's soft overlong punishment (``soft_overlong``) on the thinking's tokens only, so a long answer (code, a
    proof) is not punished for the reasoning budget. ``tokenizer`` is the policy's (the config fills in
    model.name); ``max_tokens`` is the thinking budget and has no default."""
    if completion_tokens is None:
        raise ValueError("the think_budget reward needs completion_tokens (the trainer passes them)")
    if not tokenizer:
        raise ValueError("the think_budget reward needs options: {tokenizer: <the policy's model name or folder>}")
    _check_tags(open, close)
    tok = _load_tokenizer(str(tokenizer))
    counts = [think_tokens(c, n, tok, open, close) for c, n in zip(completions, completion_tokens)]
    return soft_overlong(counts, max_tokens, cache, "think_budget")
