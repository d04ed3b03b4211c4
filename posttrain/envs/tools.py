"""The tools an environment can give a model: a schema the model is told about and a function that answers a call.

``TOOLS`` holds the built-ins: ``calculator`` (safe arithmetic on an ``ast`` walk), ``python`` (a program run in
``envs.sandbox``) and ``final_answer`` (its output is the answer; the environment ends the episode and verifies
it). A tool's ``run`` takes the call's arguments (a dict) and returns text; an error the model should read comes
back as ``error: ...``. A user's own tool is a ``Tool`` named by dotted path in ``ToolEnv(tools=[...])``.

Layer 4 (envs): imports envs.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

from posttrain.envs.sandbox import execute
from posttrain.envs.schemas import SCHEMAS


@dataclass
class Tool:
    """``run(arguments) -> text``. ``timeout_s``: the longest the environment waits for one call (its own limit
    can only tighten the environment's). ``final``: a call ends the episode and its output is the answer. A tool
    may raise TimeoutError to say it stopped itself at its limit (the environment counts it as a timeout)."""
    name: str
    schema: dict[str, Any]
    run: Callable[[dict[str, Any]], str]
    timeout_s: float = 5.0
    final: bool = False


MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 10_000
MAX_MAGNITUDE = 10 ** 300  # about the float range: beyond it no answer a model needs, and ints grow costly
MAX_RESULT_DIGITS = 300

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_SYMBOL = {ast.BitXor: "^ (use ** for powers)", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<",
           ast.RShift: ">>", ast.MatMult: "@", ast.Invert: "~", ast.Not: "not"}


class CalcError(ValueError):
    """An expression the calculator refuses; the message is what the model reads after ``error: ``."""


def _power(base: int | float, exp: int | float) -> int | float:
    if abs(exp) > MAX_EXPONENT:
        raise CalcError(f"the exponent {exp:g} is too large (at most {MAX_EXPONENT})")
    if base not in (0, 1, -1) and exp > 0 and exp * math.log10(abs(base)) > MAX_RESULT_DIGITS:
        raise CalcError(f"the result would have more than {MAX_RESULT_DIGITS} digits")
    if base == 0 and exp < 0:
        raise CalcError("division by zero")
    value = base ** exp
    if isinstance(value, complex):
        raise CalcError("the result is not a real number")
    return value


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalcError(f"only numbers are allowed, not {node.value!r}")
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            value = _power(left, right)
        else:
            try:
                value = _BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise CalcError("division by zero") from None
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_eval(node.operand))
    elif isinstance(node, (ast.BinOp, ast.UnaryOp)) and type(node.op) in _SYMBOL:
        raise CalcError(f"the operator {_SYMBOL[type(node.op)]} is not supported")
    elif isinstance(node, ast.Name):
        raise CalcError(f"names such as {node.id!r} are not allowed; use numbers and + - * / // % **")
    elif isinstance(node, ast.Call):
        raise CalcError("function calls are not allowed; use numbers and + - * / // % **")
    else:
        raise CalcError(f"{type(node).__name__} is not allowed; use numbers and + - * / // % ** and parentheses")
    if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > MAX_MAGNITUDE:
        raise CalcError("the result is too large")
    return value


def format_number(value: int | float) -> str:
    """An integral result without a decimal point ("9716", "4"), otherwise 10 significant digits ("2.5")."""
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return format(value, ".10g")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text, or ``error: ...`` saying why it was refused."""
    expression = str(expression).strip()
    if not expression:
        return "error: the expression is empty"
    if len(expression) > MAX_EXPRESSION_CHARS:
        return f"error: the expression is longer than {MAX_EXPRESSION_CHARS} characters"
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return f"error: not an arithmetic expression: {expression}"
    try:
        return format_number(_eval(tree))
    except CalcError as exc:
        return f"error: {exc}"
    except (OverflowError, RecursionError):
        return "error: the result is too large"


def calculator_tool(timeout_s: float = 5.0) -> Tool:
    return Tool("calculator", SCHEMAS["calculator"], lambda args: calculate(args["expression"]), timeout_s)


def python_tool(timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 4000) -> Tool:
    """The python tool, its program stopped at ``timeout_s`` by the sandbox itself."""
    def run(args: dict[str, Any]) -> str:
        outcome = execute(str(args["code"]), timeout_s, memory_mb, max_output_chars)
        if outcome.timed_out:
            raise TimeoutError(outcome.text)
        return outcome.text
    return Tool("python", SCHEMAS["python"], run, timeout_s)


def final_answer_tool(timeout_s: float = 5.0) -> Tool:
    return Tool("final_answer", SCHEMAS["final_answer"], lambda args: str(args["answer"]), timeout_s, final=True)


BUILDERS: dict[str, Callable[[float], Tool]] = {
    "calculator": calculator_tool, "python": python_tool, "final_answer": final_answer_tool}
TOOLS: dict[str, Tool] = {name: build() for name, build in BUILDERS.items()}
