"""Render chats to token ids with an assistant-only loss mask.

The mask is derived from the template's own output, not from generation tags: for assistant turn i we render
``messages[:i]`` with the generation prompt and ``messages[:i+1]`` without; the text between the two is what the
assistant said plus the template's end-of-turn marker, so both are trained, in every assistant turn. Spans are
character ranges in the full rendering, mapped onto tokens through the tokenizer's offsets, so token merges at
span edges cannot shift the mask. Templates whose prefixes do not render as prefixes of the whole chat (some
rewrite earlier turns) fall back to locating each assistant content and the special token that closes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.data.formats import Messages
from posttrain.errors import TemplateError

Span = tuple[int, int]


@dataclass
class Example:
    input_ids: list[int]
    trained: list[bool]  # trained[t]: token t is a loss target (predicted from tokens < t)
    row: int = 0
    source: str = ""

    @property
    def num_trained(self) -> int:
        return sum(self.trained[1:])

    def __len__(self) -> int:
        return len(self.input_ids)


def has_chat_template(tokenizer, chat_template: str | None = None) -> bool:
    return bool(chat_template or getattr(tokenizer, "chat_template", None))


def _apply(tokenizer, messages: Messages, chat_template: str | None, gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                         chat_template=chat_template)


def _end_of_turn_tokens(tokenizer) -> list[str]:
    names = [tokenizer.eos_token, *getattr(tokenizer, "all_special_tokens", [])]
    names += [t for t in ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "</s>") if t not in names]
    return [n for n in names if n]


def chat_spans(tokenizer, messages: Messages, chat_template: str | None = None) -> tuple[str, list[Span]]:
    """The rendered chat and the character spans of every assistant turn (content + end-of-turn)."""
    full = _apply(tokenizer, messages, chat_template, gen=False)
    spans: list[Span] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _apply(tokenizer, messages[:i], chat_template, gen=True)
        upto = _apply(tokenizer, messages[: i + 1], chat_template, gen=False)
        if full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
            start, end = len(before), len(upto)
            # Whitespace the template puts after the end-of-turn marker belongs to the next turn's framing.
            stripped = full[start:end].rstrip(" \n")
            if any(stripped.endswith(t) for t in _end_of_turn_tokens(tokenizer)):
                end = start + len(stripped)
        else:
            start = full.find(msg["content"], cursor)
            if start < 0:
                raise TemplateError(f"assistant turn {i} does not appear verbatim in the rendered chat; "
                                    "the template rewrites content, so the loss mask cannot be derived")
            end = start + len(msg["content"])
            rest = full[end:]
            closer = next((t for t in _end_of_turn_tokens(tokenizer) if rest.lstrip(" ").startswith(t)), None)
            if closer is None:
                raise TemplateError(f"cannot find the end-of-turn token after assistant turn {i}; "
                                    "set data.chat_template to a template that closes assistant turns")
            end += (len(rest) - len(rest.lstrip(" "))) + len(closer)
        spans.append((start, end))
        cursor = end
    return full, spans


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


def render_example(tokenizer, messages: Messages, chat_template: str | None = None) -> Example:
    if has_chat_template(tokenizer, chat_template):
        text, spans = chat_spans(tokenizer, messages, chat_template)
        ids, trained = tokenize_spans(tokenizer, text, spans, add_special_tokens=False)
    else:
        text, spans = plain_spans(tokenizer, messages)
        ids, trained = tokenize_spans(tokenizer, text, spans, add_special_tokens=True)
    return Example(input_ids=ids, trained=trained)


def render_prompt(tokenizer, messages: Messages, chat_template: str | None = None) -> str:
    """Text to generate from: the chat up to (and opening) the next assistant turn."""
    if has_chat_template(tokenizer, chat_template):
        return _apply(tokenizer, messages, chat_template, gen=True)
    return "".join(m["content"] for m in messages)


def highlight(tokenizer, example: Example) -> str:
    """Rich markup of an example with trained tokens highlighted, to check a mask by eye."""
    from rich.markup import escape

    out = []
    for tok, on in zip(example.input_ids, example.trained):
        piece = escape(tokenizer.decode([tok]))
        out.append(f"[black on green]{piece}[/]" if on else f"[dim]{piece}[/]")
    return "".join(out)
