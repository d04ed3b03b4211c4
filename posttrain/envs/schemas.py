"""The built-in tools' function definitions, in the OpenAI ``tools`` shape that ``apply_chat_template(tools=...)``
renders: what a model is told it may call. The implementations are in ``envs.tools``; demonstration data
(``curate.arithmetic``) uses the same definitions, so the model trains on the very schema it is later given.

Layer 4 (envs): imports nothing from posttrain.
"""

from __future__ import annotations

from typing import Any


def function(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": properties,
                                                            "required": required}}}


CALCULATOR = function("calculator", "Evaluate an arithmetic expression with + - * / // % ** and parentheses.",
                      {"expression": {"type": "string", "description": "for example (12 + 7) * 3"}}, ["expression"])
PYTHON = function("python", "Run a Python program and return what it prints (no network, a time and memory limit).",
                  {"code": {"type": "string", "description": "the program"}}, ["code"])
FINAL_ANSWER = function("final_answer", "Give the final answer and end the task.",
                        {"answer": {"type": "string", "description": "the answer alone"}}, ["answer"])

SCHEMAS = {"calculator": CALCULATOR, "python": PYTHON, "final_answer": FINAL_ANSWER}
