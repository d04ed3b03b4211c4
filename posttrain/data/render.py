"""Render chats to token ids with an assistant-only loss mask.

The mask is derived from the template's own output, not from generation tags: for assistant turn i we render
``messages[:i]`` with the generation prompt and ``messages[:i+1]`` without; the text between the two is what the
assistant said plus the template's end-of-turn marker, so both are trained, in every assistant turn. Spans are
character ranges in the full rendering, mapped onto tokens through the tokenizer's offsets, so token merges at
span edges cannot shift the mask. Templates whose prefixes do not render as prefixes of the whole chat (some
rewrite earlier turns) fall back to locating each assistant content and the special token that closes it.

Some templates change an assistant message as they render it: Qwen3's drops the ``<think>`` block of turns before
the last user message and adds an empty one to a final turn that has none. The trained tokens would then not be
the row's, so every turn is checked to hold its content verbatim (outer whitespace aside, which Llama 3's trims)
and nothing before it; what to do with a turn that does not is the caller's ``rewritten`` policy.

Tool chats (``tools`` passed to the template, assistant ``tool_calls``, ``tool`` results): an assistant turn's
span holds its tool calls as the template renders them, so they are trained; tool results, like user turns, are
not. A template that does not render tool calls (most base models' own, SmolLM2's among them) would train empty
turns, so the rendering is checked to hold every call, result and tool name first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

from posttrain.data.formats import Messages
from posttrain.data.templates import TEMPLATES
from posttrain.data.tool_rows import Tools
from posttrain.errors import TemplateError

Span = tuple[int, int]


@dataclass
class Example:
    input_ids: list[int]
    trained: list[bool]  # trained[t]: token t is a loss target (predicted from tokens < t)
    row: int = 0
    source: str = ""
    rewritten: list[tuple[int, str]] = field(default_factory=list)  # (message index, what the template changed)

    @property
    def num_trained(self) -> int:
        return sum(self.trained[1:])

    def __len__(self) -> int:
        return len(self.input_ids)


def has_chat_template(tokenizer, chat_template: str | None = None) -> bool:
    return bool(chat_template or getattr(tokenizer, "chat_template", None))


def _apply(tokenizer, messages: Messages, chat_template: str | None, gen: bool, tools: Tools | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen,
                                         chat_template=chat_template)


def _no_tool_template(what: str) -> TemplateError:
    return TemplateError(f"the chat template does not render tool calls ({what}); set data.chat_template to one of "
                         f"the shipped tool templates ({', '.join(TEMPLATES)}) or to a template that renders them")


def has_tool_parts(messages: Messages, tools: Tools | None = None) -> bool:
    return bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


def check_tools_rendered(text: str, messages: Messages, tools: Tools | None) -> None:
    """Raise TemplateError unless ``text`` holds every tool call's name, every tool result and every tool's name:
    a template without tool support drops them, and the calls would not be trained."""
    for i, m in enumerate(messages):
        for c in m.get("tool_calls") or []:
            if c["function"]["name"] not in text:
                raise _no_tool_template(f"messages[{i}] calls {c['function']['name']!r}, which the rendering lacks")
        if m["role"] == "tool" and (m.get("content") or "").strip() not in text:
            raise _no_tool_template(f"the tool result messages[{i}] is not in the rendering")
    for k, t in enumerate(tools or []):
        if t["function"]["name"] not in text:
            raise _no_tool_template(f"tools[{k}] ({t['function']['name']!r}) is not in the rendering")


def _end_of_turn_tokens(tokenizer) -> list[str]:
    names = [tokenizer.eos_token, *getattr(tokenizer, "all_special_tokens", [])]
    names += [t for t in ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "</s>") if t not in names]
    return [n for n in names if n]


class Turn(NamedTuple):
    index: int  # in messages
    span: Span | None  # None: its content is nowhere in the rendering
    problem: str  # what the template changed; "" when it rendered the content verbatim


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def _clip(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...") + f" ({len(text)} characters)"


def rewrite(content: str, region: str, leading: bool = True) -> str:
    """What a template did to an assistant message rendered in ``region`` (its turn, or the rest of the chat when
    ``leading`` is false): "" when the region holds the content verbatim, outer whitespace aside, with nothing
    but whitespace before it."""
    body = content.strip()
    at = region.find(body)
    if at >= 0:
        added = region[:at].strip() if leading else ""
        return f"the template added {_clip(added)} before its content" if added else ""
    think = _THINK.search(content)
    if think and _THINK.sub("", content).strip() in region:
        return f"the template dropped its thinking block {_clip(think.group(0))}"
    return "the template rewrote its content (it does not appear verbatim in the rendered chat)"


def chat_spans(tokenizer, messages: Messages, chat_template: str | None = None,
               tools: Tools | None = None) -> tuple[str, list[Span]]:
    """The rendered chat and the character spans of every assistant turn (content + end-of-turn) as the template
    renders it; ``assistant_turns`` also says what the template changed."""
    full, turns = assistant_turns(tokenizer, messages, chat_template, tools)
    _require_found(turns)
    return full, [t.span for t in turns]


def _require_found(turns: list[Turn]) -> None:
    missing = [t.index for t in turns if t.span is None]
    if missing:
        raise TemplateError(f"messages[{missing[0]}] (assistant) does not appear verbatim in the rendered chat; "
                            "the template rewrites content, so the loss mask cannot be derived")


def rewritten_message(rewritten: list[tuple[int, str]]) -> str:
    where = "; ".join(f"messages[{i}] (assistant): {problem}" for i, problem in rewritten)
    return (f"{where}. Training on it would train tokens the row does not hold: set data.rewritten_turns: mask "
            "to leave such turns out of the loss (as context), or data.chat_template to one that keeps them")


def assistant_turns(tokenizer, messages: Messages, chat_template: str | None = None,
                    tools: Tools | None = None) -> tuple[str, list[Turn]]:
    """The rendered chat and every assistant turn's span (content, tool calls, end-of-turn) with what the template
    changed in it."""
    full = _apply(tokenizer, messages, chat_template, gen=False, tools=tools)
    if has_tool_parts(messages, tools):
        check_tools_rendered(full, messages, tools)
    turns: list[Turn] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _apply(tokenizer, messages[:i], chat_template, gen=True, tools=tools)
        upto = _apply(tokenizer, messages[: i + 1], chat_template, gen=False, tools=tools)
        if full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
            start, end = len(before), len(upto)
            # Whitespace the template puts after the end-of-turn marker belongs to the next turn's framing.
            stripped = full[start:end].rstrip(" \n")
            if any(stripped.endswith(t) for t in _end_of_turn_tokens(tokenizer)):
                end = start + len(stripped)
            problem = rewrite(msg["content"], full[start:end])
            lost = [c["function"]["name"] for c in msg.get("tool_calls") or [] if c["function"]["name"] not in
                    full[start:end]]
            if lost:
                raise _no_tool_template(f"messages[{i}] calls {lost[0]!r}, but its turn does not render the call")
        elif msg.get("tool_calls"):
            raise TemplateError(f"messages[{i}] (assistant) makes tool calls, and the template does not render a "
                                "chat's start as a prefix of the whole chat, so the calls cannot be located to train "
                                f"them; set data.chat_template to one of the shipped tool templates "
                                f"({', '.join(TEMPLATES)})")
        else:
            body = msg["content"]
            start = full.find(body, cursor)
            if start < 0:  # a template that trims content (Llama 3's) still holds it stripped
                body = body.strip()
                start = full.find(body, cursor)
            if start < 0:
                turns.append(Turn(i, None, rewrite(msg["content"], full[cursor:], leading=False)))
                continue
            end, problem = start + len(body), ""
            rest = full[end:]
            closer = next((t for t in _end_of_turn_tokens(tokenizer) if rest.lstrip(" ").startswith(t)), None)
            if closer is None:
                raise TemplateError(f"cannot find the end-of-turn token after assistant turn {i}; "
                                    "set data.chat_template to a template that closes assistant turns")
            end += (len(rest) - len(rest.lstrip(" "))) + len(closer)
        turns.append(Turn(i, (start, end), problem))
        cursor = end
    return full, turns


def plain_spans(tokenizer, messages: Messages) -> tuple[str, list[Span]]:
    """No chat template: contents are concatenated as they are and each assistant turn ends with EOS."""
    if tokenizer.eos_token is None:
        raise TemplateError("the tokenizer has neither a chat template nor an EOS token to end completions with")
    text, spans = "", []
    for msg in messages:
        if msg["role"] == "assistant":
            start = len(text)
            text += msg["content"] + tokenizer.eos_token
            spans.append((start, len(text)))
        else:
            text += msg["content"]
    return text, spans


def tokenize_spans(tokenizer, text: str, spans: list[Span], add_special_tokens: bool) -> tuple[list[int], list[bool]]:
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    trained = []
    for s, e in enc["offset_mapping"]:
        # A token is trained if it overlaps an assistant span (covers tokens merged across a span edge).
        trained.append(e > s and any(s < se and e > ss for ss, se in spans))
    if ids:
        trained[0] = False  # nothing predicts the first token
    return ids, trained


def render_example(tokenizer, messages: Messages, chat_template: str | None = None,
                   rewritten: str = "keep", tools: Tools | None = None) -> Example:
    """The chat's ids and mask. ``rewritten`` is what to do with an assistant turn the template changed (listed
    in ``Example.rewritten`` either way): ``error`` raises, ``mask`` leaves it out of the loss, ``keep`` trains
    what the template rendered (for callers that train only the final turn, or only read a position). ``tools``:
    the row's function definitions, passed to the template."""
    if rewritten not in ("keep", "error", "mask"):
        raise ValueError(f"rewritten must be 'keep', 'error' or 'mask', got {rewritten!r}")
    if not has_chat_template(tokenizer, chat_template) and has_tool_parts(messages, tools):
        raise _no_tool_template("the tokenizer has no chat template at all")
    if not has_chat_template(tokenizer, chat_template):
        text, spans = plain_spans(tokenizer, messages)
        ids, trained = tokenize_spans(tokenizer, text, spans, add_special_tokens=True)
        return Example(input_ids=ids, trained=trained)
    text, turns = assistant_turns(tokenizer, messages, chat_template, tools)
    changed = [(t.index, t.problem) for t in turns if t.problem]
    if changed and rewritten == "error":
        raise TemplateError(rewritten_message(changed))
    if rewritten == "keep":
        _require_found(turns)
    spans = [t.span for t in turns if t.span is not None and not (t.problem and rewritten == "mask")]
    ids, trained = tokenize_spans(tokenizer, text, spans, add_special_tokens=False)
    return Example(input_ids=ids, trained=trained, rewritten=changed)


def render_prompt(tokenizer, messages: Messages, chat_template: str | None = None, tools: Tools | None = None) -> str:
    """Text to generate from: the chat up to (and opening) the next assistant turn, with ``tools`` offered."""
    tooled = has_tool_parts(messages, tools)
    if has_chat_template(tokenizer, chat_template):
        text = _apply(tokenizer, messages, chat_template, gen=True, tools=tools)
        if tooled:
            check_tools_rendered(text, messages, tools)
        return text
    if tooled:
        raise _no_tool_template("the tokenizer has no chat template at all")
    return "".join(m["content"] for m in messages)


def highlight(tokenizer, example: Example) -> str:
    """Rich markup of an example with trained tokens highlighted, to check a mask by eye."""
    from rich.markup import escape

    out = []
    for tok, on in zip(example.input_ids, example.trained):
        piece = escape(tokenizer.decode([tok]))
        out.append(f"[black on green]{piece}[/]" if on else f"[dim]{piece}[/]")
    return "".join(out)
