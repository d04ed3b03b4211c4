"""Row formats (OpenAI messages, Alpaca, prompt/completion, preference conversations) turned into validated chat
messages.

Preference rows may hold whole conversations, as Anthropic HH text (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) or
message lists; ``conversation`` reads either, for pairs (``pairs.row_to_pair``) and for prompts alike.

May import: posttrain.errors, posttrain.data.tool_rows.
"""

from __future__ import annotations

import re
from typing import Any

from posttrain.data.tool_rows import Tools, check_order, tool_calls, tool_result, validate_tools
from posttrain.errors import BadPair, DataError

# A message: {role, content}; an assistant's may hold tool_calls, a tool result tool_call_id and name (tool_rows).
Messages = list[dict[str, Any]]
ROLES = ("system", "user", "assistant", "tool")
# Between the text parts of one message's content. A newline, as vLLM's OpenAI-compatible server joins them, so a
# model trained here sees parts the way such a server will show them to it, and separate parts (a document, then
# a question) do not run into one another.
PART_SEPARATOR = "\n"


def detect_format(row: dict[str, Any]) -> str | None:
    if "messages" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return None


def _text(row: dict[str, Any], field: str, file: str, num: int, *, required: bool = True,
          allow_empty: bool = False) -> str:
    if field not in row or row[field] is None:
        if required:
            raise DataError(file, num, field, "missing field")
        return ""
    value = row[field]
    if not isinstance(value, str):
        raise DataError(file, num, field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(file, num, field, "is empty")
    return value


def content_text(content: Any, file: str, num: int, where: str) -> str:
    """A message's content as text: a string, or a list of OpenAI content parts of type ``text``.

    Text parts are joined with ``PART_SEPARATOR`` (a newline). Other parts (image_url, input_audio, file, ...)
    are refused: a text-only model has no input for them, and training on the text around them would teach
    answers to a question it cannot see.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(file, num, where, f"expected a string, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise DataError(file, num, at, "expected a content part {'type': 'text', 'text': ...}, "
                            f"got {type(part).__name__}")
        if part.get("type") is None:
            raise DataError(file, num, f"{at}.type", "missing field")
        if part["type"] != "text":
            raise DataError(file, num, f"{at}.type", f"a content part of type {part['type']!r} cannot be trained "
                            "on: only 'text' parts can (this is a text-only model)")
        if not isinstance(part.get("text"), str):
            got = part.get("text")
            raise DataError(file, num, f"{at}.text",
                            "missing field" if got is None else f"expected a string, got {type(got).__name__}")
        texts.append(part["text"])
    return PART_SEPARATOR.join(texts)


def validate_messages(messages: Any, file: str, num: int, field: str = "messages",
                      tools: Tools | None = None) -> Messages:
    """Check roles, order and contents: [system], then user/assistant alternating, ending with assistant; an
    assistant's tool calls are followed by their tool results (``tool_rows.check_order``). ``tools``: the row's
    function definitions (``tool_rows.validate_tools``), which every call must name.

    Returns the messages normalised to ``{role, content}`` with content a string (see ``content_text``), plus
    ``tool_calls`` (arguments parsed) and a tool result's ``tool_call_id`` and ``name``; other keys are left out."""
    if not isinstance(messages, list) or not messages:
        raise DataError(file, num, field, "expected a non-empty list of {role, content} messages")
    names = {t["function"]["name"] for t in tools} if tools else None
    seen_ids: dict[str, str] = {}
    out: Messages = []
    for i, msg in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(file, num, where, f"expected an object with role and content, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise DataError(file, num, f"{where}.role", f"role must be one of {', '.join(ROLES)}, got {role!r}")
        calls = msg.get("tool_calls")
        if calls and role != "assistant":
            raise DataError(file, num, f"{where}.tool_calls", f"only assistant messages make tool calls, not {role}")
        calls = calls if role == "assistant" and calls != [] else None
        if calls is not None and msg.get("content") is None:  # OpenAI's calls carry no content
            content = ""
        elif "content" not in msg:
            raise DataError(file, num, f"{where}.content", "missing field")
        else:
            content = content_text(msg["content"], file, num, f"{where}.content")
        if role == "assistant" and not content.strip() and calls is None:
            raise DataError(file, num, f"{where}.content", "empty assistant turn: there is nothing to train on")
        entry = tool_result(msg, content, file, num, where) if role == "tool" else {"role": role, "content": content}
        if calls is not None:
            entry["tool_calls"] = tool_calls(calls, file, num, f"{where}.tool_calls", names, seen_ids)
        out.append(entry)
    if any(m["role"] == "tool" or "tool_calls" in m for m in out):
        check_order(out, file, num, field)
        return out
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            idx = i + (len(out) - len(turns))
            raise DataError(file, num, f"{field}[{idx}].role",
                            f"wrong role order: expected {expected!r}, got {msg['role']!r} "
                            "(after an optional system message, turns alternate user/assistant)")
    if not turns or turns[-1]["role"] != "assistant":
        raise DataError(file, num, field, "the conversation must end with an assistant turn")
    return out


def _unknown_format(row: dict[str, Any], file: str, num: int) -> DataError:
    """The error for a row that is no SFT format, pointing to the command that trains on what it looks like."""
    if "chosen" in row and "rejected" in row:
        return DataError(file, num, None, "this is a preference pair (fields 'chosen' and 'rejected'), not an SFT "
                         "example: train on preference data with `posttrain dpo`, or a reward model with "
                         f"`posttrain reward`; got fields {sorted(row)}")
    if "prompt" in row and "completion" not in row:
        return DataError(file, num, "completion", "missing field: a prompt without a completion gives SFT nothing "
                         "to imitate; to train on prompts alone, with a reward, use `posttrain grpo`")
    return DataError(file, num, None, "cannot tell the row format: expected 'messages', "
                     f"'instruction'+'output' (Alpaca) or 'prompt'+'completion'; got fields {sorted(row)}")


def row_to_messages(row: dict[str, Any], fmt: str, file: str, num: int, system_prompt: str | None = None) -> Messages:
    """Turn one row into chat messages; ``fmt='auto'`` picks the format from the row's fields."""
    return row_to_chat(row, fmt, file, num, system_prompt)[0]


def row_to_chat(row: dict[str, Any], fmt: str, file: str, num: int,
                system_prompt: str | None = None) -> tuple[Messages, Tools | None]:
    """One row's chat messages and its ``tools`` (None when it gives none), validated together."""
    if fmt == "auto":
        fmt = detect_format(row) or ""
        if not fmt:
            raise _unknown_format(row, file, num)
    tools = validate_tools(row.get("tools"), file, num)
    if fmt == "messages":
        messages = validate_messages(row.get("messages"), file, num, tools=tools)
    elif fmt == "alpaca":
        instruction = _text(row, "instruction", file, num)
        extra = _text(row, "input", file, num, required=False, allow_empty=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": _text(row, "output", file, num)}]
    elif fmt == "prompt_completion":
        messages = [{"role": "user", "content": _text(row, "prompt", file, num, allow_empty=True)},
                    {"role": "assistant", "content": _text(row, "completion", file, num)}]
    else:
        raise DataError(file, num, None, f"unknown format {fmt!r}")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages, tools


def row_to_prompt(row: dict[str, Any], file: str, num: int, field: str = "prompt",
                  system_prompt: str | None = None) -> Messages:
    """The chat a row asks a model to answer: its ``field`` (text or messages), an Alpaca instruction (+ input), a
    chat ending with a user turn or a tool result (the answer reads it), an SFT chat without its last assistant
    turn, or a preference row's dialogue before the answers."""
    value, messages = row.get(field), row.get("messages")
    if isinstance(value, str) and value.strip():
        chat = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value:
        chat = validate_messages([*value, {"role": "assistant", "content": "x"}], file, num, field)[:-1]
    elif isinstance(row.get("instruction"), str) and row["instruction"].strip():  # Alpaca, output optional
        extra = row.get("input") if isinstance(row.get("input"), str) else ""
        text = f"{row['instruction']}\n\n{extra}" if extra.strip() else row["instruction"]
        chat = [{"role": "user", "content": text}]
    elif isinstance(messages, list) and messages:
        if isinstance(messages[-1], dict) and messages[-1].get("role") in ("user", "tool"):
            messages = [*messages, {"role": "assistant", "content": "x"}]
        if not any(isinstance(m, dict) and m.get("role") == "user" for m in messages):
            raise DataError(file, num, "messages", "no user turn to answer")
        chat = validate_messages(messages, file, num, tools=validate_tools(row.get("tools"), file, num))[:-1]
    elif isinstance(row.get("chosen"), (str, list)):
        chat = conversation(row["chosen"], file, num, "chosen")[:-1]
    else:
        chat = []
    if not chat or chat[-1]["role"] not in ("user", "tool"):
        raise DataError(file, num, field,
                        f"no prompt: expected a non-empty {field!r} (text or chat), an Alpaca 'instruction', chat "
                        f"'messages' or a preference row; got fields {sorted(row)}")
    if chat[-1]["role"] == "user" and not chat[-1]["content"].strip():
        where = f"messages[{len(chat) - 1}].content" if isinstance(messages, list) and value is None else field
        raise DataError(file, num, where, "the prompt (last user turn) is empty")
    if system_prompt and chat[0]["role"] != "system":
        chat = [{"role": "system", "content": system_prompt}, *chat]
    return chat


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


def conversation(value: Any, file: str, num: int, fld: str) -> Messages:
    """A whole conversation (a preference row's ``chosen`` or ``rejected``): HH text or a list of messages, with
    content parts joined into text; roles and order are left to validate_messages."""
    if isinstance(value, str):
        return parse_hh(value, file, num, fld)
    if isinstance(value, list):
        if not value:
            raise BadPair(file, num, fld, "is empty")
        return plain_messages(value, file, num, fld)
    raise DataError(file, num, fld, f"expected text or a list of messages, got {type(value).__name__}")


def plain_messages(messages: list, file: str, num: int, fld: str) -> list:
    """Copies of the messages with content parts joined into text, so that chosen and rejected compare by what
    they say; the rest is left to validate_messages."""
    return [{**m, "content": content_text(m["content"], file, num, f"{fld}[{i}].content")}
            if isinstance(m, dict) and "content" in m else m for i, m in enumerate(messages)]


def response_messages(value: Any, file: str, num: int, fld: str) -> Messages:
    """A preference row's response (``chosen`` / ``rejected`` next to a ``prompt``): text or a list of assistant
    messages, as ``{role, content}`` assistant messages; raises BadPair for an empty one."""
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
        value = plain_messages(value, file, num, fld)
        for i, m in enumerate(value):
            if not m["content"].strip():
                raise BadPair(file, num, f"{fld}[{i}].content", "empty response")
        return [{"role": "assistant", "content": m["content"]} for m in value]
    if isinstance(value, list):
        raise BadPair(file, num, fld, "empty response")
    raise DataError(file, num, fld, f"expected text or a list of assistant messages, got {type(value).__name__}")
