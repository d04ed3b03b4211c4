"""Sampled assistant text back into tool calls, for RL rollouts: the inverse of the tool templates' rendering.

``template_style`` tells from a chat template's text how it renders calls (the shipped ones in
``posttrain.data.templates``, and the Qwen2.5 / Llama 3.1 / Mistral templates they follow); ``parse_assistant``
turns one sampled turn (special tokens already stripped) into an OpenAI-shape assistant message. A call whose JSON
does not parse is still returned, its arguments the raw text, so that a reward or an environment can tell a model
that called a tool badly from one that did not call.

Layer 1. May import: posttrain.errors.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from posttrain.errors import TemplateError

_DECODER = json.JSONDecoder()
_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')
_CALL_START = r'\{\s*"name"\s*:'


def arguments_object(value: Any) -> dict[str, Any] | None:
    """A tool call's arguments as a dict: a dict; a JSON string of an object (some models encode arguments
    twice); nothing or blank text is no arguments. None for anything else (not JSON, or JSON but not an object)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, dict) else None


def _arguments(value: Any) -> dict[str, Any] | str:
    """The arguments as a dict where they are one; else the raw text, so the trainer sees what was sampled."""
    obj = arguments_object(value)
    if obj is not None:
        return obj
    return value if isinstance(value, str) else json.dumps(value)


def _from_object(obj: Any) -> tuple[str, dict[str, Any] | str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    return obj["name"], _arguments(obj.get("arguments", obj.get("parameters", {})))


def _decode(body: str) -> tuple[str, dict[str, Any] | str] | None:
    """(name, arguments) of one call's JSON text; for text that is not JSON, the name found in it and the raw text
    after its "arguments" key; None when it names no function."""
    body = body.strip()
    try:
        obj, _ = _DECODER.raw_decode(body)
        return _from_object(obj)
    except json.JSONDecodeError:
        pass
    name = _NAME.search(body)
    if name is None:
        return None
    try:
        fn = json.loads(f'"{name.group(1)}"')
    except json.JSONDecodeError:
        fn = name.group(1)
    args = _ARGS.search(body, name.end()) or _ARGS.search(body)
    if args is None:
        return fn, {}
    raw = body[args.end():].rstrip()
    return fn, _arguments(raw[:-1].rstrip() if raw.endswith("}") else raw)


def _message(content: str, calls: list[tuple[str, dict[str, Any] | str]], turn: int) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": content.strip()}
    if calls:
        msg["tool_calls"] = [{"id": f"call_{turn}_{k}", "type": "function", "function": {"name": n, "arguments": a}}
                             for k, (n, a) in enumerate(calls)]
    return msg


_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def parse_hermes(text: str, turn: int) -> dict[str, Any]:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks; the text outside them is the content."""
    calls, kept, pos = [], [], 0
    for m in _HERMES.finditer(text):
        call = _decode(m.group(1))
        if call is None:  # not a call: left in the content, where a reward can see it
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    return _message("".join(kept), calls, turn)


_LLAMA_CALLS = re.compile(r"(?:^|\n\n)\s*(?=" + _CALL_START + ")")


def parse_llama3(text: str, turn: int) -> dict[str, Any]:
    """A JSON call ``{"name": ..., "parameters": {...}}`` (several joined by ``; ``), the whole turn or after the
    content and a blank line; an optional ``<|python_tag|>`` before it is dropped."""
    text = text.replace("<|python_tag|>", "")
    start = _LLAMA_CALLS.search(text)
    if start is None:
        return _message(text, [], turn)
    pieces = re.split(r";\s*(?=" + _CALL_START + ")", text[start.end():])
    calls = [c for c in map(_decode, pieces) if c is not None]
    return _message(text[:start.start()] if calls else text, calls, turn)


_MISTRAL_LIST = re.compile(r"\[\s*(?=" + _CALL_START + ")")


def parse_mistral(text: str, turn: int) -> dict[str, Any]:
    """``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`` after the content; [TOOL_CALLS] is a special
    token that decoding may have stripped, so a trailing JSON list of calls counts as well."""
    at = text.find("[TOOL_CALLS]")
    if at >= 0:
        content, rest = text[:at], text[at + len("[TOOL_CALLS]"):].strip()
    else:
        m = _MISTRAL_LIST.search(text)
        if m is None:
            return _message(text, [], turn)
        content, rest = text[:m.start()], text[m.start():].strip()
    try:
        items, _ = _DECODER.raw_decode(rest)
        items = items if isinstance(items, list) else [items]
        calls = [c for c in map(_from_object, items) if c is not None]
    except json.JSONDecodeError:
        body = rest[1:] if rest.startswith("[") else rest
        body = body.rstrip()
        body = body[:-1] if body.endswith("]") else body
        calls = [c for c in map(_decode, re.split(r",\s*(?=" + _CALL_START + ")", body)) if c is not None]
    return _message(content if calls else text, calls, turn)


STYLES: dict[str, Callable[[str, int], dict[str, Any]]] = {
    "hermes": parse_hermes,
    "llama3": parse_llama3,
    "mistral": parse_mistral,
}

# What marks each style in a template's text, in the order they are tried.
_MARKERS = (("hermes", ("<tool_call>",)), ("mistral", ("[TOOL_CALLS]",)),
            ("llama3", ("<|start_header_id|>", "ipython")))


def template_style(template: str) -> str:
    """The tool-call style of a chat template's text: "hermes", "llama3" or "mistral"."""
    for style, marks in _MARKERS:
        if all(m in template for m in marks):
            return style
    looked = "; ".join(f"{' and '.join(repr(m) for m in marks)} ({style})" for style, marks in _MARKERS)
    raise TemplateError(f"cannot tell how this chat template renders tool calls: looked for {looked}; use one of the "
                        "shipped tool templates (posttrain.data.templates)")


def parse_assistant(text: str, style: str, turn: int) -> dict[str, Any]:
    """A sampled assistant turn as ``{"role": "assistant", "content": str, "tool_calls": [...]}`` ("tool_calls"
    only when it makes calls; ids ``call_{turn}_{k}``; arguments a dict, or the raw text when not valid JSON)."""
    if style not in STYLES:
        raise TemplateError(f"unknown tool-call style {style!r}; known: {', '.join(STYLES)}")
    return STYLES[style](text, turn)
