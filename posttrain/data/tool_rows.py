"""Tool-call chats in the OpenAI shape: a row's ``tools`` (JSON-schema function definitions), assistant
``tool_calls`` and ``tool`` result messages, validated for ``formats.validate_messages``.

Normalised calls keep ``{id, type, function: {name, arguments}}`` with ``arguments`` parsed into a dict, since chat
templates render them with ``tojson`` (a JSON string would be rendered as a quoted string). A tool message gets the
``name`` of the call it answers, which some templates print.

Order: [system], user, then assistant; an assistant with tool calls is followed by one tool message per call (ids
matching, any order), then an assistant turn; an assistant without calls by a user turn. The chat ends with an
assistant turn without calls.

Layer 1. May import: posttrain.errors.
"""

from __future__ import annotations

import json
from typing import Any

from posttrain.errors import DataError

Tools = list[dict[str, Any]]

_TOOL_SHAPE = "{'type': 'function', 'function': {'name': ..., 'description': ..., 'parameters': {...}}}"


def _clip(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _json_string(value: Any, file: str, num: int | None, field: str) -> Any:
    """A value some data sets store as a JSON string, parsed; anything else as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise DataError(file, num, field, f"a JSON string that does not parse ({exc}): {_clip(value)}") from None


def validate_tools(value: Any, file: str, num: int | None, field: str = "tools") -> Tools | None:
    """A row's ``tools``: a list of function definitions (or that list as a JSON string, as some data sets store
    it). None or an empty list means no tools were given, so tool calls are not checked against them."""
    if value is None:
        return None
    value = _json_string(value, file, num, field)
    if not isinstance(value, list):
        raise DataError(file, num, field, f"expected a list of function definitions {_TOOL_SHAPE}, "
                        f"got {type(value).__name__}")
    seen: set[str] = set()
    for k, tool in enumerate(value):
        at = f"{field}[{k}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise DataError(file, num, at, f"not a function definition: expected {_TOOL_SHAPE}, got {_clip(tool)}")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(file, num, f"{at}.function.name",
                            "missing field" if name is None else f"expected a non-empty string, got {_clip(name)}")
        if name in seen:
            raise DataError(file, num, f"{at}.function.name", f"a second function named {name!r}")
        seen.add(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise DataError(file, num, f"{at}.function.description",
                            f"expected a string, got {type(fn['description']).__name__}")
        params = fn.get("parameters")
        if params is not None and not (isinstance(params, dict) and params.get("type", "object") == "object"):
            raise DataError(file, num, f"{at}.function.parameters",
                            f"expected a JSON schema of an object {{'type': 'object', 'properties': {{...}}}}, "
                            f"got {_clip(params)}")
    return value or None


def _arguments(value: Any, file: str, num: int | None, at: str) -> dict[str, Any]:
    if value is None:
        raise DataError(file, num, at, "missing field (a function without arguments takes {})")
    value = _json_string(value, file, num, at)
    if not isinstance(value, dict):
        raise DataError(file, num, at, f"must be a JSON object of argument names and values, got "
                        f"{type(value).__name__} {_clip(value)}")
    return value


def tool_calls(calls: Any, file: str, num: int | None, where: str, tool_names: set[str] | None,
               seen_ids: dict[str, str]) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` (at ``where``), normalised; ``seen_ids`` (id -> where it was made)
    collects ids across the chat, which must be unique in it."""
    if not isinstance(calls, list):
        raise DataError(file, num, where, f"expected a list of tool calls, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise DataError(file, num, at, "expected a tool call {'id': ..., 'type': 'function', 'function': "
                            f"{{'name': ..., 'arguments': ...}}}}, got {type(call).__name__}")
        cid = call.get("id")
        if not isinstance(cid, str) or not cid.strip():
            raise DataError(file, num, f"{at}.id",
                            "missing field" if cid is None else f"expected a non-empty string, got {_clip(cid)}")
        if cid in seen_ids:
            raise DataError(file, num, f"{at}.id", f"duplicate tool call id {cid!r} (also at {seen_ids[cid]})")
        seen_ids[cid] = at
        if call.get("type", "function") != "function":
            raise DataError(file, num, f"{at}.type", f"only 'function' tool calls are supported, got {call['type']!r}")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise DataError(file, num, f"{at}.function", "missing field" if fn is None else
                            f"expected {{'name': ..., 'arguments': ...}}, got {type(fn).__name__}")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(file, num, f"{at}.function.name",
                            "missing field" if name is None else f"expected a non-empty string, got {_clip(name)}")
        if tool_names is not None and name not in tool_names:
            raise DataError(file, num, f"{at}.function.name", f"calls {name!r}, which is not among the row's tools "
                            f"({', '.join(sorted(tool_names))})")
        args = _arguments(fn.get("arguments"), file, num, f"{at}.function.arguments")
        out.append({"id": cid, "type": "function", "function": {"name": name, "arguments": args}})
    return out


def tool_result(msg: dict[str, Any], content: str, file: str, num: int | None, where: str) -> dict[str, Any]:
    """A ``tool`` message normalised to ``{role, tool_call_id, content}`` (+ ``name`` when it has one);
    ``check_order`` matches it to its call."""
    cid = msg.get("tool_call_id")
    if not isinstance(cid, str) or not cid.strip():
        raise DataError(file, num, f"{where}.tool_call_id", "missing field: a tool message names the call it "
                        "answers" if cid is None else f"expected a non-empty string, got {_clip(cid)}")
    out = {"role": "tool", "tool_call_id": cid, "content": content}
    name = msg.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise DataError(file, num, f"{where}.name", f"expected a string, got {type(name).__name__}")
        out["name"] = name
    return out


_ORDER = ("after an optional system message, turns alternate user/assistant; an assistant's tool calls are "
          "followed by their tool results (role 'tool'), then by an assistant turn")


def check_order(out: list[dict[str, Any]], file: str, num: int | None, field: str) -> None:
    """Check the order of a chat with tool messages or calls, matching each tool result to its call (and filling
    in its ``name``)."""
    pending: dict[str, str] = {}  # the open calls of the last assistant turn: id -> function name
    answered: set[str] = set()
    calls_at: int | None = None  # the index of the assistant whose results are expected or being read
    expected = "user"
    for i in range(1 if out[0]["role"] == "system" else 0, len(out)):
        msg, where = out[i], f"{field}[{i}]"
        if msg["role"] == "tool":
            if calls_at is None:
                raise DataError(file, num, f"{where}.role", "a tool message with no tool call before it: tool "
                                "results follow the assistant message whose tool_calls they answer")
            cid = msg["tool_call_id"]
            if cid not in pending:
                problem = (f"a second result for tool call {cid!r}" if cid in answered else
                           f"unknown tool_call_id {cid!r}: {field}[{calls_at}] made the calls "
                           f"{', '.join(repr(c) for c in [*answered, *pending])}")
                raise DataError(file, num, f"{where}.tool_call_id", problem)
            name = pending.pop(cid)
            answered.add(cid)
            if msg.get("name") not in (None, name):
                raise DataError(file, num, f"{where}.name", f"names {msg['name']!r}, but tool call {cid!r} called "
                                f"{name!r}")
            msg["name"] = name
            continue
        if pending:
            _unanswered(out, pending, calls_at, file, num, field, f"before {where}")
        if calls_at is not None:
            expected, calls_at = "assistant", None
        if msg["role"] != expected:
            raise DataError(file, num, f"{where}.role",
                            f"wrong role order: expected {expected!r}, got {msg['role']!r} ({_ORDER})")
        if msg.get("tool_calls"):
            pending = {c["id"]: c["function"]["name"] for c in msg["tool_calls"]}
            answered, calls_at, expected = set(), i, "tool"
        else:
            expected = "assistant" if msg["role"] == "user" else "user"
    if pending:
        _unanswered(out, pending, calls_at, file, num, field, "at the end of the chat")
    if out[-1]["role"] != "assistant":
        raise DataError(file, num, field, "the conversation must end with an assistant turn")


def _unanswered(out: list[dict[str, Any]], pending: dict[str, str], at: int | None, file: str, num: int | None,
                field: str, when: str) -> None:
    j, call = next((j, c) for j, c in enumerate(out[at]["tool_calls"]) if c["id"] in pending)
    raise DataError(file, num, f"{field}[{at}].tool_calls[{j}]",
                    f"tool call {call['id']!r} ({call['function']['name']}) has no tool result: expected a tool "
                    f"message with tool_call_id {call['id']!r} {when}")
