"""Prompt files: the chats a model is asked to answer (generation, RL rollouts, replay), read and validated.

May import: posttrain.errors, posttrain.data.formats, readers, render.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.data.formats import Messages, conversation, row_to_prompt, validate_messages
from posttrain.data.readers import read_rows
from posttrain.data.render import has_chat_template, render_example, render_prompt
from posttrain.errors import DataError


def load_prompt_chats(path: str, field: str = "prompt", system_prompt: str | None = None) -> list[tuple[int, Messages]]:
    """(row number, chat to answer) for every row of a prompts file (see formats.row_to_prompt for what a row may
    be); a .txt file is one prompt per non-empty line."""
    if str(path).endswith(".txt"):
        lines = [(i, line.strip()) for i, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
        rows = [(i, {field: text}) for i, text in lines]
    else:
        rows = read_rows(path)
    return [(num, row_to_prompt(row, path, num, field, system_prompt)) for num, row in rows]


def _dialogue_before_answer(row: dict[str, Any], path: str, num: int) -> Messages:
    conv = conversation(row["chosen"], path, num, "chosen")
    return conv[:-1] if conv and conv[-1].get("role") == "assistant" else []


def _chat_before_answer(row: dict[str, Any], path: str, num: int) -> Messages:
    """An SFT row's ``messages`` without the final assistant turn: the dialogue that turn answers."""
    return validate_messages(row["messages"], path, num)[:-1]


def row_answer(row: dict[str, Any], path: str, num: int | None, prompt_field: str) -> str:
    """The answer a prompt row carries (``load_prompts`` reads its prompt): a ``completion`` column beside a text or
    chat prompt, else the last assistant turn of its ``messages`` (an SFT row) or of its ``chosen`` conversation
    (a preference row). Distillation's off-policy sequences."""
    if row.get(prompt_field) is not None:
        if isinstance(row.get("completion"), str) and row["completion"].strip():
            return row["completion"]
        raise DataError(path, num, "completion", f"no answer beside the prompt {prompt_field!r}: expected a "
                        "non-empty 'completion' (or a 'messages' row ending with the assistant's answer)")
    for field, turns in (("messages", lambda: validate_messages(row["messages"], path, num)),
                         ("chosen", lambda: conversation(row["chosen"], path, num, "chosen"))):
        if row.get(field) is not None:
            last = turns()[-1]
            if last.get("role") != "assistant" or not last["content"].strip():
                raise DataError(path, num, field, "the conversation does not end with an assistant answer")
            return last["content"]
    raise DataError(path, num, prompt_field, f"no answer: expected 'messages' or 'chosen' (or {prompt_field!r} "
                    f"with a 'completion'); this row has {', '.join(map(repr, row)) or 'no columns'}")


def answer_ids(tokenizer, chat: Messages, answer: str, chat_template: str | None) -> list[int]:
    """The token ids of ``answer`` as the assistant's reply to ``chat``, as training renders it: the final trained
    span of the whole conversation (the answer and the template's end-of-turn token), which follows the prompt's
    rendering (``render_prompt``)."""
    ex = render_example(tokenizer, [*chat, {"role": "assistant", "content": answer}], chat_template)
    end = max(i for i, on in enumerate(ex.trained) if on) + 1
    start = end
    while start > 0 and ex.trained[start - 1]:
        start -= 1
    return ex.input_ids[start:end]


def check_answers(path: str, prompt_field: str, limit: int | None = None) -> None:
    """Every row of a prompts file (the first ``limit``) carries an answer (``row_answer``); the first that does
    not stops with its file, row and field."""
    rows = read_rows(path)
    for num, row in rows[:limit] if limit else rows:
        row_answer(row, path, num, prompt_field)


def load_prompts(path: str, tokenizer, *, prompt_field: str, system_prompt: str | None, max_prompt_len: int,
                 overlong: str, chat_template: str | None,
                 limit: int | None = None) -> tuple[list[list[int]], list[dict[str, Any]], list[Messages], list[str]]:
    """Prompt token ids, the rows (their other columns feed the rewards), the prompts as chats, report lines.

    A row's prompt is its ``prompt_field`` (text or chat messages) or, in a preference file, the dialogue its
    ``chosen`` answer replies to, or in an SFT file the ``messages`` before the last assistant turn.
    ``chat_template`` is the template itself (already resolved), or None for the tokenizer's. Over
    ``max_prompt_len`` tokens, ``overlong`` 'error' stops and 'drop' skips the row."""
    add_special = not has_chat_template(tokenizer, chat_template)
    rows = read_rows(path)[:limit] if limit else read_rows(path)
    ids, kept, chats, dropped = [], [], [], []
    for num, row in rows:
        value = row.get(prompt_field)
        if isinstance(value, str) and value.strip():
            chat = [{"role": "user", "content": value}]
        elif isinstance(value, list) and value:
            # validated with a stand-in answer after it; the normalised turns (text parts joined) are kept
            chat = validate_messages(list(value) + [{"role": "assistant", "content": "x"}], path, num,
                                     prompt_field)[:-1]
        elif value is None and isinstance(row.get("chosen"), (str, list)) and \
                (dialogue := _dialogue_before_answer(row, path, num)):
            chat = dialogue  # a preference file: the dialogue its answers reply to
        elif value is None and isinstance(row.get("messages"), list) and row["messages"]:
            chat = _chat_before_answer(row, path, num)  # an SFT file: the dialogue its last answer replies to
        else:
            raise DataError(path, num, prompt_field, "missing or empty prompt (data.prompt_field names the "
                            "column; a preference row's chosen conversation or an SFT row's messages also give "
                            "one; this row has "
                            f"{', '.join(map(repr, row)) or 'no columns'})")
        if system_prompt and chat[0].get("role") != "system":
            chat = [{"role": "system", "content": system_prompt}, *chat]
        tokens = tokenizer(render_prompt(tokenizer, chat, chat_template), add_special_tokens=add_special)["input_ids"]
        if len(tokens) > max_prompt_len:
            if overlong == "error":
                raise DataError(path, num, prompt_field, f"{len(tokens)} tokens, more than "
                                f"data.max_prompt_len={max_prompt_len}; raise it or set data.overlong: drop")
            dropped.append(num)
            continue
        ids.append(tokens)
        kept.append(row)
        chats.append(chat)
    line = f"{path}: {len(rows)} prompts, {len(ids)} kept" + (f"; {len(dropped)} dropped as over-long" if dropped
                                                              else "")
    if not ids:
        raise DataError(path, None, None, "no prompt is left (see data.max_prompt_len and data.overlong)")
    return ids, kept, chats, [line]
