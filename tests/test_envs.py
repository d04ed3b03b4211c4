"""The tool environment: the calculator's arithmetic and refusals, ToolEnv's episodes (answers, errors, timeouts,
final_answer, truncation, dotted paths) and the python sandbox's limits, each ending as text within its time."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from posttrain.envs import TOOLS, StepResult, Tool, ToolEnv, make_environment
from posttrain.envs.sandbox import run_python
from posttrain.envs.tools import calculate
from posttrain.errors import DataError

LIMIT_S, MEMORY_MB, SLACK_S = 2.0, 256, 3.0


def call(name: str, arguments, call_id: str = "c1") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def assistant(*calls: dict, content: str = "") -> dict:
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = list(calls)
    return message


ROW = {"prompt": "What is 347 * 28 + 3?", "answer": "9719"}


# Objects named by dotted path in the tests below.
def _boom(args: dict) -> str:
    raise RuntimeError("the tool broke")


def _sleepy(args: dict) -> str:
    time.sleep(3.0)
    return "too late"


BROKEN = Tool("broken", {"type": "function", "function": {"name": "broken", "parameters": {}}}, _boom)
SLOW = Tool("slow", {"type": "function", "function": {"name": "slow", "parameters": {}}}, _sleepy, timeout_s=0.2)


def starts_with_seven(answer: str, row: dict) -> float:
    return float(answer.strip().startswith("7"))


class EchoEnv:
    def __init__(self, greeting: str = "hi"):
        self.tools, self.greeting = [], greeting

    def reset(self, row: dict) -> list[dict]:
        return [{"role": "user", "content": self.greeting}]

    def step(self, message: dict) -> StepResult:
        return StepResult(None, float(message["content"] == self.greeting), True, {})


# --- calculator


@pytest.mark.parametrize("expression, expected", [
    ("347 * 28", "9716"), ("10 / 4", "2.5"), ("8 / 2", "4"), ("(12 + 7) * 3", "57"), ("-3 + +5", "2"),
    ("7 // 2", "3"), ("7 % 3", "1"), ("2 ** 10", "1024"), ("2 ** -1", "0.5"), ("1 / 3", "0.3333333333"),
    ("1_000 * 3", "3000"), ("1.5 * 4", "6")])
def test_calculator_evaluates_and_formats(expression, expected):
    assert calculate(expression) == expected
    assert TOOLS["calculator"].run({"expression": expression}) == expected


@pytest.mark.parametrize("expression, says", [
    ("x + 1", "names"), ("abs(-3)", "function calls"), ("__import__('os').system('echo hi')", "function calls"),
    ("(1).real", "Attribute"), ("9 ** 9 ** 9", "too large"), ("10 ** 100000", "too large"),
    ("2 ** 5000", "digits"), ("1 / 0", "division by zero"), ("5 // 0", "division by zero"),
    ("5 % 0", "division by zero"), ("0 ** -1", "division by zero"), ("(-8) ** 0.5", "not a real number"),
    ("2 ^ 3", "use **"), ("'a' * 3", "only numbers"), ("1 +", "not an arithmetic expression"),
    ("1e308 * 10", "too large"), ("", "empty"), ("1+" * 400 + "1", "longer than")])
def test_calculator_refuses_with_an_error_text(expression, says):
    out = calculate(expression)
    assert out.startswith("error: ") and says in out, out


# --- ToolEnv


def test_reset_builds_the_opening_chat_and_names_a_missing_field():
    env = ToolEnv(["calculator"], system_prompt="Use the tools.")
    assert env.reset(ROW) == [{"role": "system", "content": "Use the tools."},
                              {"role": "user", "content": ROW["prompt"]}]
    assert env.tools == [TOOLS["calculator"].schema]
    with pytest.raises(DataError, match="'question'.*prompt_field"):
        ToolEnv(["calculator"], prompt_field="question").reset(ROW)
    with pytest.raises(DataError, match="'gold'"):
        ToolEnv(["calculator"], answer_field="gold").reset(ROW)


@pytest.mark.parametrize("answer, reward", [("The answer is 9,719.", 1.0), ("It is 9718.", 0.0), ("no idea", 0.0)])
def test_a_tool_call_then_an_answer(answer, reward):
    env = ToolEnv(["calculator"])
    env.reset(ROW)
    r = env.step(assistant(call("calculator", '{"expression": "347 * 28"}', "call_1"),
                           call("calculator", {"expression": "9716 + 3"}, "call_2")))
    assert not r.done and r.reward == 0.0
    assert r.observation == [{"role": "tool", "tool_call_id": "call_1", "name": "calculator", "content": "9716"},
                             {"role": "tool", "tool_call_id": "call_2", "name": "calculator", "content": "9719"}]
    assert r.info == {"tool_calls": 2.0, "tool_errors": 0.0, "timeouts": 0.0, "truncated": 0.0}
    end = env.step(assistant(content=answer))
    assert end.done and end.observation is None and end.reward == reward
    with pytest.raises(RuntimeError, match="reset"):
        env.step(assistant(content=answer))


def test_exact_verifier():
    env = ToolEnv([], verifier="exact")
    env.reset({"prompt": "Capital of France?", "answer": "Paris"})
    assert env.step(assistant(content=" Paris\n")).reward == 1.0
    env.reset({"prompt": "Capital of France?", "answer": "Paris"})
    assert env.step(assistant(content="It is Paris")).reward == 0.0


def test_bad_calls_become_error_messages():
    env = ToolEnv(["calculator", "tests.test_envs:BROKEN"])
    env.reset(ROW)
    r = env.step(assistant(call("search", {"q": "x"}, "a"), call("calculator", '{"expression": "1 +', "b"),
                           call("calculator", {}, "c"), call("broken", {}, "d"),
                           call("calculator", {"expression": "x"}, "e")))
    assert [m["tool_call_id"] for m in r.observation] == ["a", "b", "c", "d", "e"]
    texts = [m["content"] for m in r.observation]
    assert all(t.startswith("error: ") for t in texts), texts
    assert "no tool 'search'" in texts[0] and "calculator, broken" in texts[0]
    assert "not a JSON object" in texts[1] and "needs the argument 'expression'" in texts[2]
    assert "RuntimeError: the tool broke" in texts[3] and "names" in texts[4]
    assert r.info["tool_errors"] == 5.0 and r.info["timeouts"] == 0.0 and not r.done


def test_a_slow_tool_is_stopped_at_its_timeout():
    env = ToolEnv(["tests.test_envs:SLOW", "calculator"])
    env.reset(ROW)
    start = time.monotonic()
    r = env.step(assistant(call("slow", {}, "a"), call("calculator", {"expression": "1 + 1"}, "b")))
    assert time.monotonic() - start < 1.5
    assert r.observation[0]["content"] == "error: the tool slow ran past its 0.2 s limit"
    assert r.observation[1]["content"] == "2"
    assert r.info["timeouts"] == 1.0 and r.info["tool_errors"] == 0.0


def test_final_answer_ends_the_episode():
    env = ToolEnv(["calculator", "final_answer"])
    env.reset(ROW)
    r = env.step(assistant(call("final_answer", {"answer": "9719"})))
    assert r.done and r.observation is None and r.reward == 1.0 and r.info["tool_calls"] == 1.0
    env.reset(ROW)
    r = env.step(assistant(call("final_answer", {"reply": "9719"})))  # a bad call: the episode goes on
    assert not r.done and "needs the argument 'answer'" in r.observation[0]["content"]
    assert env.step(assistant(call("final_answer", '{"answer": "9000"}'))).reward == 0.0


def test_the_turn_limit_truncates_without_running_the_last_calls():
    ran = []
    counting = Tool("count", {"type": "function", "function": {"name": "count", "parameters": {}}},
                    lambda args: ran.append(1) or str(len(ran)))
    env = ToolEnv([counting, "final_answer"], max_turns=2)
    env.reset(ROW)
    assert not env.step(assistant(call("count", {}))).done
    r = env.step(assistant(call("count", {})))
    assert r.done and r.observation is None and r.reward == 0.0 and r.info["truncated"] == 1.0
    assert len(ran) == 1
    env.reset(ROW)
    env.step(assistant(call("count", {})))
    r = env.step(assistant(call("count", {}), call("final_answer", {"answer": "9719"})))  # an answer still counts
    assert r.done and r.reward == 1.0 and r.info["truncated"] == 0.0 and len(ran) == 2


def test_make_environment_builtin_dotted_and_errors():
    factory = make_environment("tools", {"tools": ["calculator"], "verifier": "tests.test_envs:starts_with_seven"})
    a, b = factory(), factory()
    assert a is not b and a.tools == [TOOLS["calculator"].schema]
    a.reset({"prompt": "Pick a number"})  # a dotted verifier reads the row itself: no answer field needed
    assert a.step(assistant(content="7 it is")).reward == 1.0
    echo = make_environment("tests.test_envs:EchoEnv", {"greeting": "hello"})()
    assert echo.reset({}) == [{"role": "user", "content": "hello"}]
    assert echo.step(assistant(content="hello")).reward == 1.0
    with pytest.raises(ValueError, match="built-ins: tools"):
        make_environment("nope", {})
    with pytest.raises(ValueError, match="options"):
        make_environment("tools", {"tools": ["calculator"], "max_turn": 3})
    with pytest.raises(ValueError, match="unknown tool 'abacus'"):
        make_environment("tools", {"tools": ["abacus"]})
    with pytest.raises(ValueError, match="unknown verifier"):
        make_environment("tools", {"tools": [], "verifier": "fuzzy"})
    with pytest.raises(ValueError, match="cannot import"):
        make_environment("tests.test_envs:Missing", {})


# --- the python sandbox


def sandboxed(code: str, max_output_chars: int = 2000, limit_s: float = LIMIT_S) -> tuple[str, float]:
    start = time.monotonic()
    out = run_python(code, limit_s, MEMORY_MB, max_output_chars)
    elapsed = time.monotonic() - start
    assert elapsed < limit_s + SLACK_S, (elapsed, out)
    return out, elapsed


def test_a_program_prints_and_its_directory_is_removed():
    out, _ = sandboxed("import os\nprint(sum(range(10)))\nopen('note.txt', 'w').write('ok')\n"
                       "print(open('note.txt').read())\nprint(os.getcwd())")
    lines = out.splitlines()
    assert lines[:2] == ["45", "ok"]
    assert "posttrain-python-" in lines[2] and not Path(lines[2]).exists()


def test_output_is_capped():
    out, _ = sandboxed("print('x' * 100000)", max_output_chars=500)
    assert out == "x" * 500 + "\n[output cut at 500 characters]"


def test_an_error_exit_shows_the_traceback_and_the_code():
    out, _ = sandboxed("print('before')\nraise ValueError('bad input')")
    assert out.startswith("error: the program exited with code 1") and "before" in out
    assert out.splitlines()[-1] == "ValueError: bad input"
    assert sandboxed("import sys\nsys.exit(3)")[0] == "error: the program exited with code 3"


def test_an_infinite_loop_is_stopped():
    out, elapsed = sandboxed("while True: pass")
    assert out == "error: the program ran past its 2 s limit" and elapsed >= LIMIT_S


@pytest.mark.parametrize("code", ["x = bytearray(10**10)", "x = []\nwhile True: x.append(' ' * 10**6)"])
def test_a_memory_bomb_ends_in_memory_error(code):
    # The memory limit is under test, not the time limit: 256 appends take ~0.3 s alone, but past 2 s on cores
    # the rest of the suite is loading (seen once in a clean-clone run), so the clock is given room.
    out, _ = sandboxed(code, limit_s=20.0)
    assert out.startswith("error: ") and out.splitlines()[-1] == "MemoryError", out


@pytest.mark.parametrize("host", ["127.0.0.1", "8.8.8.8"])
def test_no_network(host):
    out, _ = sandboxed(f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('{host}', 53))")
    assert out.startswith("error: ") and out.splitlines()[-1].startswith("PermissionError: sandbox: no network")


def test_no_writing_outside_its_directory(tmp_path):
    target = Path("/tmp") / f"posttrain-sandbox-{uuid.uuid4().hex}.txt"
    other = tmp_path / "keep.txt"
    other.write_text("keep")
    for code in [f"open({str(target)!r}, 'w').write('x')", f"open({str(other)!r}, 'a').write('x')",
                 f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)",
                 f"import os\nos.remove({str(other)!r})", f"import pathlib\npathlib.Path({str(target)!r}).touch()",
                 "import os\nos.symlink('/tmp', 'up')\nopen('up/escape.txt', 'w')"]:
        out, _ = sandboxed(code)
        assert "PermissionError: sandbox:" in out.splitlines()[-1], (code, out)
    assert not target.exists() and other.read_text() == "keep" and not Path("/tmp/escape.txt").exists()
    assert sandboxed(f"print(open({str(other)!r}).read())")[0] == "keep"  # reading is allowed


@pytest.mark.parametrize("code", [
    "import subprocess\nsubprocess.run(['echo', 'spawned'])", "import os\nos.system('echo spawned')",
    "import os\nos.execv('/bin/echo', ['echo', 'spawned'])", "import os\nprint(os.fork())",
    "import os\nos.posix_spawn('/bin/echo', ['echo', 'spawned'], {})", f"import os\nos.kill({os.getpid()}, 0)"])
def test_no_processes(code):
    out, _ = sandboxed(code)
    assert "spawned" not in out.splitlines() and out.splitlines()[-1].startswith("PermissionError: sandbox:"), out


def test_the_python_tool_in_an_environment():
    env = ToolEnv(["python"], tool_timeout_s=LIMIT_S)
    env.reset(ROW)
    r = env.step(assistant(call("python", {"code": "print(347 * 28 + 3)"}, "a"),
                           call("python", {"code": "while True: pass"}, "b")))
    assert r.observation[0]["content"] == "9719"
    assert r.observation[1]["content"] == "error: the program ran past its 2 s limit"
    assert r.info["timeouts"] == 1.0 and r.info["tool_errors"] == 0.0
