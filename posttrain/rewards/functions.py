"""Verifiable reward functions for online RL, and how a config names and combines them.

The interface is one signature: ``fn(prompts, completions, **row) -> list[float]``, one score per completion.
``row`` holds the dataset's other columns as lists aligned with the completions (for GSM8K, ``answer``), so a
verifier can compare against a reference. Built-ins are in ``REWARD_FUNCTIONS``; a user's own function is named
by dotted path (``mypkg.rewards:score`` or ``mypkg.rewards.score``) in the same place.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
from typing import Any, Callable, Sequence

from posttrain.rewards.model import RewardModel
from posttrain.rewards.process import prm_reward
from posttrain.rewards.thinking import THINK_CLOSE, THINK_OPEN, soft_overlong, strip_think, think_budget, think_format

RewardFn = Callable[..., list[float]]

_NUMBER = r"-?[\d,]*\.?\d+"
_FINAL = re.compile(r"####\s*(" + _NUMBER + r")")
_ANY_NUMBER = re.compile(_NUMBER)


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def final_number(text: str, strict: bool = True) -> float | None:
    """The number after ``####`` (GSM8K's answer line); with ``strict=False`` the last number in the text when
    there is no such line."""
    m = _FINAL.search(text)
    if m:
        return _to_number(m.group(1))
    if strict:
        return None
    found = _ANY_NUMBER.findall(text)
    return _to_number(found[-1]) if found else None


def answer_text(completion: str, after_think: bool | Sequence[str] = False) -> str:
    """What a verifier reads: the whole completion, or with ``after_think`` only the text after the thinking block
    (``strip_think``); ``after_think`` is true for ``<think>``/``</think>`` or the [open, close] tags."""
    if not after_think:
        return completion
    open_tag, close_tag = (THINK_OPEN, THINK_CLOSE) if after_think is True else after_think
    return strip_think(completion, open_tag, close_tag)


def gsm8k_answer(prompts: Sequence[Any], completions: Sequence[str], answer: Sequence[str] | None = None,
                 strict: bool = True, after_think: bool | Sequence[str] = False, **row: Any) -> list[float]:
    """1.0 when the completion's final number equals the reference's (``#### 72`` in GSM8K's ``answer``); with
    ``after_think`` the number is read after the thinking block, never inside it."""
    if answer is None:
        raise ValueError("gsm8k_answer needs the dataset's 'answer' column")
    out = []
    for completion, ref in zip(completions, answer):
        gold = final_number(str(ref), strict=False)
        got = final_number(answer_text(completion, after_think), strict=strict)
        out.append(float(gold is not None and got is not None and abs(got - gold) < 1e-6))
    return out


def regex_match(prompts: Sequence[Any], completions: Sequence[str], pattern: str = r"####\s*" + _NUMBER,
                full: bool = False, after_think: bool | Sequence[str] = False, **row: Any) -> list[float]:
    """1.0 when the completion matches ``pattern`` (anywhere, or the whole text with ``full``): a format reward.
    With ``after_think`` only the answer after the thinking block is matched."""
    rx = re.compile(pattern, re.DOTALL)
    texts = [answer_text(c, after_think) for c in completions]
    return [float(bool(rx.fullmatch(t.strip()) if full else rx.search(t))) for t in texts]


def _schema_errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """A small JSON-Schema subset: type, enum, properties, required, additionalProperties: false, items."""
    types = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool,
             "null": type(None)}
    want = schema.get("type")
    if want:
        allowed = want if isinstance(want, list) else [want]
        ok = any(isinstance(value, types[t]) and not (t in ("integer", "number") and isinstance(value, bool))
                 for t in allowed)
        if not ok:
            return [f"{where}: expected {want}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: not one of {schema['enum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing {key!r}")
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key in value:
                errors += _schema_errors(value[key], sub, f"{where}.{key}")
        if schema.get("additionalProperties") is False:
            errors += [f"{where}: unexpected {k!r}" for k in value if k not in props]
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += _schema_errors(item, schema["items"], f"{where}[{i}]")
    return errors


def json_schema(prompts: Sequence[Any], completions: Sequence[str], schema: dict[str, Any] | None = None,
                **row: Any) -> list[float]:
    """1.0 for a completion that is one JSON value matching ``schema`` (any JSON when no schema is given)."""
    out = []
    for c in completions:
        try:
            value = json.loads(c.strip())
        except json.JSONDecodeError:
            out.append(0.0)
            continue
        out.append(float(not schema or not _schema_errors(value, schema)))
    return out


def length_penalty(prompts: Sequence[Any], completions: Sequence[str], max_chars: int = 1000,
                   per_char: float = 0.001, **row: Any) -> list[float]:
    """0 up to ``max_chars`` characters, then -per_char for every character beyond (never positive)."""
    return [-per_char * max(0, len(c) - max_chars) for c in completions]


def overlong(prompts: Sequence[Any], completions: Sequence[str], completion_tokens: Sequence[int] | None = None,
             max_tokens: int | None = None, cache: int | None = None, **row: Any) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), by tokens: 0 up to ``max_tokens - cache``, then
    ((max_tokens - cache) - len) / cache falling linearly to -1 at ``max_tokens``, and -1 beyond. ``max_tokens``
    defaults (in the config) to grpo.max_new_tokens; ``cache`` to a fifth of it, DAPO's 4096 of 20480. For a
    thinking model it counts the thinking and the answer together: the generation budget; ``think_budget`` is the
    same punishment on the thinking alone."""
    if completion_tokens is None:
        raise ValueError("the overlong reward needs completion_tokens (the trainer passes them)")
    return soft_overlong(completion_tokens, max_tokens, cache, "overlong")


@functools.lru_cache(maxsize=4)
def _load_reward_model(path: str, device: str, dtype: str):
    return RewardModel(path, device=device, dtype=dtype)


def reward_model(prompts: Sequence[Any], completions: Sequence[str], path: str | None = None, batch_size: int = 8,
                 device: str = "auto", dtype: str = "auto", **row: Any) -> list[float]:
    """The score of a reward model trained by ``posttrain reward`` (its run folder): a learned proxy, so worth
    watching next to a verifier (see ``watch``). Loaded once per process."""
    if not path:
        raise ValueError("the reward_model reward needs options: {path: <a `posttrain reward` run folder>}")
    return _load_reward_model(str(path), device, dtype).score(prompts, completions, batch_size)


REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "gsm8k_answer": gsm8k_answer,
    "regex": regex_match,
    "json_schema": json_schema,
    "length_penalty": length_penalty,
    "overlong": overlong,
    "reward_model": reward_model,
    "prm": prm_reward,
    "think_format": think_format,
    "think_budget": think_budget,
}


def resolve_reward(name: str) -> RewardFn:
    """A built-in by name, or a user's function by dotted path ``package.module:function`` / ``package.module.fn``."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    module, sep, attr = name.partition(":")
    if not sep:
        module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(f"unknown reward {name!r}; built-ins: {', '.join(REWARD_FUNCTIONS)}; or give a dotted "
                         "path such as mypkg.rewards:score")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward {name!r}: cannot import {attr!r} from {module!r} ({exc})") from None
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    return fn


def call_reward(fn: RewardFn, prompts: Sequence[Any], completions: Sequence[str], name: str = "",
                **kw: Any) -> list[float]:
    """Call a reward function and check it kept its side of the interface."""
    scores = fn(prompts, completions, **kw)
    if len(scores) != len(completions):
        raise ValueError(f"reward {name or fn.__name__} returned {len(scores)} scores for {len(completions)} "
                         "completions")
    return [float(s) for s in scores]


class Combined:
    """Several rewards, each with a weight and its own options, reduced per completion by a weighted sum or
    the minimum; ``parts`` keeps every term's scores of the last call for logging."""

    def __init__(self, terms: list[tuple[str, float, dict[str, Any]]], reduce: str = "sum"):
        if reduce not in ("sum", "min"):
            raise ValueError(f"reduce must be 'sum' or 'min', got {reduce!r}")
        self.terms = []
        for k, (name, weight, opts) in enumerate(terms):
            label = name if name not in [t[0] for t in self.terms] else f"{name}#{k}"  # parts need distinct keys
            self.terms.append((label, weight, resolve_reward(name), opts))
        self.reduce = reduce
        self.parts: dict[str, list[float]] = {}

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], **row: Any) -> list[float]:
        self.parts = {}
        for name, weight, fn, opts in self.terms:
            scores = call_reward(fn, prompts, completions, name, **row, **opts)
            self.parts[name] = scores
            self.parts[f"{name}@w"] = [weight * s for s in scores]
        weighted = [self.parts[f"{name}@w"] for name, *_ in self.terms]
        if self.reduce == "sum":
            return [sum(col) for col in zip(*weighted)]
        return [min(col) for col in zip(*weighted)]
