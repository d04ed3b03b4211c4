"""``ToolEnv``: a question from a data row, tools the model may call for a few turns, and a verifier for the answer.

Each turn the model's tool calls are run in order (each in a worker thread, waited on for at most its timeout) and
their results come back as ``tool`` messages. Whatever goes wrong with a call (an unknown tool, arguments that are
not a JSON object, a missing argument, a tool that raises or runs too long) becomes an ``error: ...`` result the
model can read and recover from, never an exception in the rollout. The episode ends when the model answers
without calling a tool (its text is the answer) or calls a final tool (``final_answer``: its argument is the
answer); the reward is the verifier's score of that answer against the row. At ``max_turns`` a model still calling
tools gets reward 0 and ``truncated``.

Layer 4 (envs): imports envs, rewards.functions and errors.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from posttrain.data.toolcalls import arguments_object
from posttrain.envs.base import StepResult, resolve
from posttrain.envs.tools import BUILDERS, Tool
from posttrain.errors import DataError
from posttrain.rewards.functions import final_number

Message = dict[str, Any]
MAX_GRACE_S = 1.0  # extra wait, so a tool that enforces its own limit (the python sandbox) reports it first


def number_match(answer: str, reference: Any) -> float:
    """1.0 when the last number in the answer ("The answer is 8,507." -> 8507) equals the reference's (a number,
    or text whose ``#### N`` line or last number is read)."""
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        gold: float | None = float(reference)
    else:
        gold = final_number(str(reference), strict=False)
    got = final_number(str(answer), strict=False)
    return float(gold is not None and got is not None and abs(got - gold) <= 1e-6 * max(1.0, abs(gold)))


def exact_match(answer: str, reference: Any) -> float:
    """1.0 when the answer, stripped, is the reference's text, stripped."""
    return float(str(answer).strip() == str(reference).strip())


VERIFIERS: dict[str, Callable[[str, Any], float]] = {"number": number_match, "exact": exact_match}


def _tool(spec: str | Tool, timeout_s: float) -> Tool:
    if isinstance(spec, Tool):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a tool is a name ({', '.join(BUILDERS)}) or a dotted path to a Tool, not {spec!r}")
    if spec in BUILDERS:
        return BUILDERS[spec](timeout_s)
    if ":" not in spec and "." not in spec:
        raise ValueError(f"unknown tool {spec!r}; built-ins: {', '.join(BUILDERS)}; or a dotted path such as "
                         "mypkg.tools:my_tool")
    obj = resolve(spec, "tool")
    tool = obj if isinstance(obj, Tool) else obj() if callable(obj) else None
    if not isinstance(tool, Tool):
        raise ValueError(f"tool {spec!r} is neither a posttrain.envs.tools.Tool nor a function returning one")
    return tool


def call_tool(tool: Tool, arguments: dict[str, Any], timeout_s: float) -> tuple[str, str]:
    """(text, kind): kind is "" for a result, "error" or "timeout". The tool runs in a daemon thread; past its
    limit the environment stops waiting (the thread is left to finish on its own)."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["out"] = tool.run(arguments)
        except BaseException as exc:  # a tool calling sys.exit must not end the trainer's worker thread silently
            box["exc"] = exc

    worker = threading.Thread(target=work, daemon=True, name=f"tool-{tool.name}")
    worker.start()
    worker.join(timeout_s + min(MAX_GRACE_S, timeout_s / 2))
    if worker.is_alive():
        return f"error: the tool {tool.name} ran past its {timeout_s:g} s limit", "timeout"
    if "exc" in box:
        exc = box["exc"]
        if isinstance(exc, TimeoutError):
            return str(exc) or f"error: the tool {tool.name} ran past its {timeout_s:g} s limit", "timeout"
        return f"error: the tool {tool.name} failed: {type(exc).__name__}: {exc}", "error"
    text = box["out"] if isinstance(box["out"], str) else str(box["out"])
    return text, "error" if text.startswith("error:") else ""


class ToolEnv:
    """Tools by name (``calculator``, ``python``, ``final_answer``), dotted path (``mypkg.tools:my_tool``) or
    ``Tool``; ``verifier``: a ``VERIFIERS`` name (called with the row's ``answer_field``) or a dotted path to
    ``fn(answer: str, row: dict) -> float``. ``max_turns`` counts assistant messages. ``tool_timeout_s`` bounds
    every call (a tool's own ``timeout_s`` can only tighten it)."""

    def __init__(self, tools: list[str | Tool], verifier: str = "number", max_turns: int = 4,
                 tool_timeout_s: float = 5.0, prompt_field: str = "prompt", answer_field: str = "answer",
                 system_prompt: str | None = None):
        if isinstance(tools, str) or not isinstance(tools, (list, tuple)):
            raise ValueError(f"tools must be a list of tool names ({', '.join(BUILDERS)}), got {tools!r}")
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns must be a whole number >= 1, got {max_turns!r}")
        if not isinstance(tool_timeout_s, (int, float)) or tool_timeout_s <= 0:
            raise ValueError(f"tool_timeout_s must be a positive number of seconds, got {tool_timeout_s!r}")
        self.table: dict[str, Tool] = {}
        for spec in tools:
            tool = _tool(spec, float(tool_timeout_s))
            if tool.name in self.table:
                raise ValueError(f"two tools are named {tool.name!r}")
            self.table[tool.name] = tool
        self.tools: list[dict[str, Any]] = [t.schema for t in self.table.values()]
        self.verifier_name = verifier
        self.verify = self._verifier(verifier, answer_field)
        self.max_turns, self.tool_timeout_s = max_turns, float(tool_timeout_s)
        self.prompt_field, self.answer_field, self.system_prompt = prompt_field, answer_field, system_prompt
        self.row: dict[str, Any] | None = None
        self.turns, self.done = 0, False

    @staticmethod
    def _verifier(name: str, answer_field: str) -> Callable[[str, dict[str, Any]], float]:
        if name in VERIFIERS:
            fn = VERIFIERS[name]
            return lambda answer, row: fn(answer, row[answer_field])
        if not isinstance(name, str) or (":" not in name and "." not in name):
            raise ValueError(f"unknown verifier {name!r}; built-ins: {', '.join(VERIFIERS)}; or a dotted path "
                             "such as mypkg.verify:score (fn(answer, row) -> float)")
        fn = resolve(name, "verifier")
        if not callable(fn):
            raise ValueError(f"verifier {name!r} is not callable")
        return fn

    def _require(self, row: dict[str, Any], field: str, option: str) -> None:
        if field not in row:
            raise DataError("the data row", None, field, f"missing (the row has {sorted(row)}); set the tools "
                            f"environment's {option} option to the column that holds it")

    def reset(self, row: dict[str, Any]) -> list[Message]:
        self._require(row, self.prompt_field, "prompt_field")
        if self.verifier_name in VERIFIERS:
            self._require(row, self.answer_field, "answer_field")
        self.row, self.turns, self.done = row, 0, False
        prompt = row[self.prompt_field]
        opening = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        if self.system_prompt is not None and not (opening and opening[0].get("role") == "system"):
            opening.insert(0, {"role": "system", "content": self.system_prompt})
        return opening

    def _finish(self, answer: str, info: dict[str, float]) -> StepResult:
        self.done = True
        assert self.row is not None
        return StepResult(None, float(self.verify(answer, self.row)), True, info)

    def _run(self, call: Any) -> tuple[str, str, Tool | None]:
        """(text, kind, tool) for one call; tool is None when no tool of that name exists."""
        fn = call.get("function") if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            return "error: a tool call without a function name", "error", None
        tool = self.table.get(name)
        if tool is None:
            return f"error: there is no tool {name!r}; the tools are {', '.join(self.table) or 'none'}", "error", None
        args = arguments_object(fn.get("arguments"))
        if args is None:
            raw = str(fn.get("arguments"))
            return f"error: the arguments of {name} are not a JSON object: {raw[:200]}", "error", tool
        required = tool.schema.get("function", {}).get("parameters", {}).get("required", [])
        missing = [k for k in required if k not in args]
        if missing:
            return f"error: {name} needs the argument {', '.join(map(repr, missing))}", "error", tool
        text, kind = call_tool(tool, args, min(tool.timeout_s, self.tool_timeout_s))
        return text, kind, tool

    def step(self, assistant: Message) -> StepResult:
        if self.row is None or self.done:
            raise RuntimeError("ToolEnv.step needs reset(row) first (one environment per episode)")
        self.turns += 1
        calls = assistant.get("tool_calls") or []
        info = {"tool_calls": float(len(calls)), "tool_errors": 0.0, "timeouts": 0.0, "truncated": 0.0}
        if not calls:
            return self._finish(str(assistant.get("content") or ""), info)
        last = self.turns >= self.max_turns
        finals = {name for name, t in self.table.items() if t.final}
        messages: list[Message] = []
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if last and name not in finals:
                continue  # the turn limit: only a final answer is still heard
            text, kind, tool = self._run(call)
            if tool is not None and tool.final and not kind:
                return self._finish(text, info)
            info["tool_errors"] += kind == "error"
            info["timeouts"] += kind == "timeout"
            call_id = call.get("id", "") if isinstance(call, dict) else ""
            messages.append({"role": "tool", "tool_call_id": str(call_id), "name": str(name or ""),
                             "content": text})
        if last:
            self.done = True
            info["truncated"] = 1.0
            return StepResult(None, 0.0, True, info)
        return StepResult(messages, 0.0, False, info)
