"""The OpenAI wire format: request validation (every refusal names its field) and response/chunk shapes."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

DEFAULT_MAX_TOKENS = 512  # when a request names none; the context limit still applies

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
                408: "timeout_error", 411: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
                503: "server_error", 504: "timeout_error"}


class ServeError(Exception):
    """A refusal with its HTTP status; rendered as OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0  # OpenAI's default; 0 is greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0  # vLLM's: no stop token (EOS, end of turn, stop_token_ids) before this many tokens
    stop_token_ids: tuple[int, ...] = ()  # vLLM's: more tokens that end a choice (finish_reason "stop"), listed
    logprobs: int | None = None  # alternatives to report per token; None: no logprobs are computed for the row


@dataclass
class GenerationRequest:
    kind: str  # "chat" or "completion"
    model: str
    prompts: list  # chat: one list of messages; completion: strings or token-id lists (n choices each)
    max_tokens: int | None
    sampling: dict = field(default_factory=dict)  # Sampling's fields but max_tokens, known once prompts are tokens
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprobs' tokens written "token_id:{id}"
    return_token_ids: bool = False  # vLLM's: the sampled ids on each choice, the prompt's beside them


# Fields this server does not implement; accepting them silently would return something other than was asked.
# Each maps to a test of "the client left it at its default".
_UNSUPPORTED = {
    "echo": lambda v: not v,
    "suffix": lambda v: not v, "logit_bias": lambda v: not v, "tools": lambda v: not v,
    "functions": lambda v: not v, "best_of": lambda v: v in (None, 1),
    "presence_penalty": lambda v: not v, "frequency_penalty": lambda v: not v,
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type", "text") == "text"),
}


def _number(body: dict, name: str, default, *, lo: float, hi: float, integer: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise ServeError(400, f"'{name}' must be {kind} in [{lo}, {hi}], got {v!r}", param=name)
    return v


def _messages(body: dict) -> list[dict]:
    """The chat, checked as training checks its data (roles, their order, contents), so the server answers only
    conversations of the shape the model was trained on."""
    from posttrain.data.formats import validate_messages
    from posttrain.errors import DataError

    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ServeError(400, "'messages' is required: a non-empty list of {role, content} objects", param="messages")
    # Training's check wants the assistant turn the model learns from; here that is the turn it is asked to write.
    # A chat may also end on an assistant turn, as OpenAI allows.
    last = msgs[-1]
    asked = not (isinstance(last, dict) and last.get("role") == "assistant")
    try:
        out = validate_messages([*msgs, {"role": "assistant", "content": "x"}] if asked else msgs, "request", None,
                                "messages")
    except DataError as exc:
        if (exc.field or "").startswith(f"messages[{len(msgs)}]"):  # the added turn, refused: nothing before it
            # is a user turn (a lone system message)
            raise ServeError(400, "'messages' has no user turn for the model to answer", param="messages") from None
        raise ServeError(400, f"{exc.field}: {exc.problem}" if exc.field else exc.problem,
                         param=exc.field or "messages") from None
    return out[:-1] if asked else out


def _prompts(body: dict, vocab_size: int | None) -> list:
    """The prompts: strings, or token-id lists (vLLM's and OpenAI's forms), which are used as they are."""
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return p
        if all(isinstance(x, list) for x in p):
            return [_token_ids(x, f"prompt[{i}]", vocab_size) for i, x in enumerate(p)]
        if not any(isinstance(x, (str, list)) for x in p):
            return [_token_ids(p, "prompt", vocab_size)]
    raise ServeError(400, "'prompt' is required: a string, a non-empty list of strings, a list of token ids or a "
                          "list of lists of token ids", param="prompt")


def _token_ids(ids: list, name: str, vocab_size: int | None) -> list[int]:
    if not ids:
        raise ServeError(400, f"'{name}' is empty: a token-id prompt needs at least one id", param=name)
    hi = vocab_size if vocab_size is not None else float("inf")
    for j, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < hi:
            bound = f"in [0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ServeError(400, f"'{name}[{j}]' must be a token id, an integer {bound}; got {t!r}",
                             param=f"{name}[{j}]")
    return ids


def _flag(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise ServeError(400, f"'{name}' must be true or false, got {v!r}", param=name)
    return bool(v)


def _logprobs(body: dict, kind: str) -> int | None:
    """How many alternatives to report per token, or None for no logprobs. Completions ask with ``logprobs: k``;
    chat with ``logprobs: true`` and ``top_logprobs: k`` (which needs the former, as vLLM and OpenAI say)."""
    if kind == "completion":
        if body.get("top_logprobs"):
            raise ServeError(400, "'top_logprobs' is a chat field; a completion asks with 'logprobs': k",
                             param="top_logprobs")
        return _number(body, "logprobs", None, lo=0, hi=20, integer=True)
    wanted = _flag(body, "logprobs")
    k = _number(body, "top_logprobs", None, lo=0, hi=20, integer=True)
    if k and not wanted:
        raise ServeError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (k or 0) if wanted else None


def _stop_token_ids(body: dict, vocab_size: int | None) -> tuple[int, ...]:
    v = body.get("stop_token_ids")
    if not v:
        return ()
    if not isinstance(v, list):
        raise ServeError(400, "'stop_token_ids' must be a list of token ids", param="stop_token_ids")
    return tuple(_token_ids(v, "stop_token_ids", vocab_size))


def parse_generation(body: Any, kind: str, vocab_size: int | None = None) -> GenerationRequest:
    """The request, checked. ``vocab_size`` bounds token-id prompts (the server passes its tokenizer's)."""
    if not isinstance(body, dict):
        raise ServeError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ServeError(400, "'model' is required: the base's served name or an adapter's name", param="model")
    for name, is_default in _UNSUPPORTED.items():
        if name in body and not is_default(body[name]):
            raise ServeError(400, f"'{name}' is not supported by this server", param=name)
    prompts = [_messages(body)] if kind == "chat" else _prompts(body, vocab_size)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, None, lo=1, hi=10 ** 9, integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise ServeError(400, "'stop' must be a non-empty string or a list of at most 16 of them", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ServeError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ServeError(400, "'stream_options' must be an object", param="stream_options")
    top_p = _number(body, "top_p", 1.0, lo=0.0, hi=1.0)
    if top_p == 0:
        raise ServeError(400, "'top_p' must be greater than 0", param="top_p")
    logprobs = _logprobs(body, kind)
    return_ids = _flag(body, "return_token_ids")
    # A streamed chunk's text is cut where the text is stable, not at token boundaries: tokens and their logprobs
    # would not line up with the pieces. Refused rather than sent in another shape than vLLM's.
    if stream and logprobs is not None:
        raise ServeError(400, "'logprobs' cannot be combined with 'stream' on this server", param="logprobs")
    if stream and return_ids:
        raise ServeError(400, "'return_token_ids' cannot be combined with 'stream' on this server",
                         param="return_token_ids")
    sampling = {"temperature": float(_number(body, "temperature", 1.0, lo=0.0, hi=2.0)), "top_p": float(top_p),
                "seed": _number(body, "seed", None, lo=-2 ** 63, hi=2 ** 64 - 1, integer=True), "stop": tuple(stop),
                "min_tokens": _number(body, "min_tokens", 0, lo=0, hi=10 ** 9, integer=True), "logprobs": logprobs,
                "stop_token_ids": _stop_token_ids(body, vocab_size)}
    return GenerationRequest(kind=kind, model=model, prompts=prompts, max_tokens=max_tokens, sampling=sampling,
                             stream=stream, include_usage=bool(stream and options.get("include_usage")),
                             n=_number(body, "n", 1, lo=1, hi=64, integer=True),
                             tokens_as_ids=_flag(body, "return_tokens_as_token_ids"), return_token_ids=return_ids)


def sampling_for(req: GenerationRequest, prompt_len: int, max_len: int | None) -> Sampling:
    """The request's sampling with max_tokens checked against the model's context (a refusal, never a silent cut)."""
    param = "messages" if req.kind == "chat" else "prompt"
    if prompt_len == 0:
        raise ServeError(400, "the prompt is empty", param=param)
    room = (max_len - prompt_len) if max_len else None
    if room is not None and room < 1:
        raise ServeError(400, f"the prompt is {prompt_len} tokens; the model's context is {max_len}", param=param)
    if req.max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS if room is None else min(DEFAULT_MAX_TOKENS, room)
    elif room is not None and req.max_tokens > room:
        raise ServeError(400, f"prompt ({prompt_len} tokens) + max_tokens ({req.max_tokens}) exceeds the model's "
                              f"context of {max_len} tokens", param="max_tokens")
    else:
        max_tokens = req.max_tokens
    if req.sampling["min_tokens"] > max_tokens:
        raise ServeError(400, f"'min_tokens' ({req.sampling['min_tokens']}) exceeds max_tokens ({max_tokens})",
                         param="min_tokens")
    seed = req.sampling["seed"]
    return Sampling(max_tokens=max_tokens, **{**req.sampling, "seed": None if seed is None else seed % 2 ** 63})


def choice_sampling(sampling: Sampling, j: int) -> Sampling:
    """Choice ``j`` of a prompt's n: with a request seed s its generator is seeded with (s + j) mod 2**63 (vLLM's
    rule for its n child requests), so the whole response repeats for the same request while the n choices draw
    different samples; without a seed each row draws its own random seed. Seeds s and s + 1 share n - 1 choices'
    generators: a client that wants fresh samples per request spaces its seeds at least n apart."""
    return sampling if sampling.seed is None else replace(sampling, seed=(sampling.seed + j) % 2 ** 63)


def chars_per_token_bound(tokenizer) -> int:
    """At most how many characters of a prompt one token stands for: a prompt of C characters is at least
    C / this many tokens, known without tokenizing it.

    A vocabulary entry is at least as long as the text it covers (byte-level BPE spells each byte as one character,
    SentencePiece a space as one '▁', WordPiece adds '##'; added tokens are spelt as they are), so the longest entry
    bounds one token's text. A normaliser can shorten the text first: Unicode composition (NFC, NFKC) merges at most 4
    code points into one (the longest canonical decomposition, U+1FAF's). One that deletes text (collapsing runs of
    spaces, as some encoder tokenizers do) could make a prompt past this bound fit; such prompts would be refused.
    """
    longest = max(map(len, tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)  # None: a slow tokenizer, whose normalising is unknown
    return longest if backend is not None and backend.normalizer is None else 4 * longest


def check_prompt_chars(req: GenerationRequest, chars: int, chars_per_token: int, max_len: int | None) -> None:
    """Refuse a prompt that cannot fit the context by its length in characters: it has at least
    ceil(chars / chars_per_token) tokens. Anything that passes is checked on its real length by sampling_for."""
    if not max_len:
        return
    at_least = -(-chars // chars_per_token)
    param = "messages" if req.kind == "chat" else "prompt"
    if at_least >= max_len:
        raise ServeError(400, f"the prompt is {chars} characters, at least {at_least} tokens; the model's context "
                              f"is {max_len}", param=param)
    if req.max_tokens is not None and at_least + req.max_tokens > max_len:
        raise ServeError(400, f"prompt (at least {at_least} tokens) + max_tokens ({req.max_tokens}) exceeds the "
                              f"model's context of {max_len} tokens", param="max_tokens")


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Choice:
    """What one choice received: its text pieces joined, then its done event's finish and tokens."""
    prompt_ids: list[int]
    text: str = ""
    finish_reason: str = "stop"
    token_ids: list[int] = field(default_factory=list)
    steps: list | None = None  # logprobs.Step per token, when asked


def response(gen: GenerationRequest, rid: str, choices: list[Choice], use: dict, tokenizer) -> dict:
    """The whole answer. vLLM's extensions: with return_token_ids each choice has ``token_ids``, and the prompt's ids
    are ``prompt_token_ids`` on each completion choice, on the response for chat (vLLM >= 0.10.2)."""
    # Imported here, the one use: logprobs loads torch, and the wire format alone (the HTTP plumbing, which
    # posttrain ui reuses and starts in well under a second) needs none.
    from posttrain.serve import logprobs

    k, chat = gen.sampling["logprobs"], gen.kind == "chat"
    out = []
    for i, c in enumerate(choices):
        lp = None
        if k is not None:
            lp = (logprobs.chat_logprobs(c.steps, tokenizer, k, gen.tokens_as_ids) if chat
                  else logprobs.completion_logprobs(c.steps, tokenizer, gen.tokens_as_ids))
        item = {"index": i, "message": {"role": "assistant", "content": c.text}} if chat else \
            {"index": i, "text": c.text}
        item.update(finish_reason=c.finish_reason, logprobs=lp)
        if gen.return_token_ids:
            item["token_ids"] = c.token_ids
            if not chat:
                item["prompt_token_ids"] = c.prompt_ids
        out.append(item)
    body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": gen.model, "choices": out, "usage": use}
    if chat and gen.return_token_ids:
        body["prompt_token_ids"] = choices[0].prompt_ids
    return body


def chunk(kind: str, rid: str, model: str, index: int | None, *, text: str | None = None,
          finish_reason: str | None = None, first: bool = False, use: dict | None = None) -> dict:
    """One SSE chunk: a text piece, the opening role delta (chat), a finish, or (index None) the usage-only tail."""
    if index is None:
        choices = []
    elif kind == "chat":
        delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
        choices = [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    else:
        choices = [{"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}]
    out = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
           "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out
