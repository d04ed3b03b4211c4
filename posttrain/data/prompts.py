"""Prompt files: the chats a model is asked to answer (generation, RL rollouts, replay), read and validated.

May import: posttrain.errors, posttrain.data.formats, readers, render.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.data.formats import Messages, conversation, row_to_prompt, validate_messages
from posttrain.data.readers import read_rows
from posttrain.data.render import has_chat_template, render_prompt
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


def load_prompts(path: str, tokenizer, *, prompt_field: str, system_prompt: str | None, max_prompt_len: int,
                 overlong: str, chat_template: str | None,
                 limit: int | None = None) -> tuple[list[list[int]], list[dict[str, Any]], list[Messages], list[str]]:
    """Prompt token ids, the rows (their other columns feed the rewards), the prompts as chats, report lines.

    A row's prompt is its ``prompt_field`` (text or chat messages) or, in a preference file, the dialogue its
    ``chosen`` answer replies to. ``chat_template`` is the template itself (already resolved), or None for the
    tokenizer's. Over ``max_prompt_len`` tokens, ``overlong`` 'error' stops and 'drop' skips the row."""
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
        else:
            raise DataError(path, num, prompt_field, "missing or empty prompt (data.prompt_field names the "
                            "column; a preference row's chosen conversation also gives one; this row has "
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
