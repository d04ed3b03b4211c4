"""Tool-call chats: validation, the shipped tool templates' masks checked against a string-search oracle, the
refusal of a template without tool support, name lookup, and parsing sampled turns back into calls."""

import copy
import json

import pytest

from posttrain.cli import main
from posttrain.data.examples import build_examples
from posttrain.data.formats import row_to_chat, row_to_messages
from posttrain.data.render import render_example, render_prompt
from posttrain.data.templates import TEMPLATES, resolve_template, template_text
from posttrain.data.toolcalls import STYLES, parse_assistant, template_style
from posttrain.errors import DataError, TemplateError
from tests.helpers import write_jsonl

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "local_time", "description": "Clock reading for a place",
                                      "parameters": {"type": "object", "properties": {"place": {"type": "string"}}}}},
]


def _call(cid, name, args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


ROW = {"tools": TOOLS, "messages": [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "Is it sunny in Oslo, and what hour is it there?"},
    {"role": "assistant", "content": "Checking both.", "tool_calls": [
        _call("c1", "get_weather", json.dumps({"city": "Oslo"})), _call("c2", "local_time", {"place": "Oslo"})]},
    {"role": "tool", "tool_call_id": "c2", "content": "09:41 CET"},  # results in another order than the calls
    {"role": "tool", "tool_call_id": "c1", "content": "{\"sky\": \"clear\", \"temp_c\": 4}"},
    {"role": "assistant", "content": "Clear skies at 4 C, and it is 09:41."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": None, "tool_calls": [_call("c3", "get_weather", "{\"city\": \"Bergen\"}"),
                                                          _call("c4", "local_time", "{}")]},
    {"role": "tool", "tool_call_id": "c3", "content": "rain"},
    {"role": "tool", "tool_call_id": "c4", "name": "local_time", "content": "09:42 CET"},
    {"role": "assistant", "content": "Bergen has rain; you are welcome."},
]}

# How each style renders an assistant's calls, written independently of the templates, and its end-of-turn.
CALL_TEXT = {
    "hermes": lambda calls: "\n".join("<tool_call>\n" + json.dumps({"name": n, "arguments": a}) + "\n</tool_call>"
                                      for n, a in calls),
    "llama3": lambda calls: "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls),
    "mistral": lambda calls: "[TOOL_CALLS] " + json.dumps([{"name": n, "arguments": a} for n, a in calls]),
}
END = {"hermes-tools": "<|im_end|>", "llama31-tools": "<|eot_id|>", "mistral-tools": "<|im_end|>"}  # eos: SmolLM2's


def test_messages_are_normalised():
    messages, tools = row_to_chat(ROW, "auto", "f.jsonl", 1)
    assert tools == TOOLS
    first = messages[2]["tool_calls"]
    assert first[0]["function"]["arguments"] == {"city": "Oslo"}  # parsed from the JSON string
    assert messages[7]["content"] == ""  # OpenAI's content: null beside calls
    assert [m.get("name") for m in messages[3:5]] == ["local_time", "get_weather"]  # filled from the calls
    assert set(messages[3]) == {"role", "tool_call_id", "content", "name"}


def _spans(full, messages, style, eot):
    """By plain string search in order: each assistant turn's spans (content, calls, end-of-turn), the spans of
    system, user and tool text, and the end of the first user turn (everything before it is context)."""
    turns, never, cursor, first_user_end = [], [], 0, None

    def find(text):
        nonlocal cursor
        at = full.find(text, cursor)
        assert at >= 0, f"{text!r} not found after {cursor}"
        cursor = at + len(text)
        return at, cursor

    for m in messages:
        if m["role"] != "assistant":
            never.append(find(m["content"]))
            first_user_end = first_user_end or (never[-1][1] if m["role"] == "user" else None)
            continue
        spans = [find(m["content"])] if m["content"] else []
        if m.get("tool_calls"):
            spans.append(find(CALL_TEXT[style]([(c["function"]["name"], c["function"]["arguments"])
                                                for c in m["tool_calls"]])))
        assert full.startswith(eot, cursor), full[cursor:cursor + 20]  # the end-of-turn right after the turn
        spans.append(find(eot))
        turns.append(spans)
    return turns, never, first_user_end


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_tool_chat_mask_matches_string_search_oracle(tokenizer, name):
    template = template_text(name)
    style = template_style(template)
    messages, tools = row_to_chat(ROW, "auto", "f.jsonl", 1)
    ex = render_example(tokenizer, messages, template, rewritten="error", tools=tools)
    full = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=template)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    assert ex.input_ids == enc["input_ids"]
    offsets = enc["offset_mapping"]
    turns, never, first_user_end = _spans(full, messages, style, END[name])
    assert len(turns) == 4
    for s, e in (span for spans in turns for span in spans):
        covering = [t for t, (a, b) in enumerate(offsets) if a < e and b > s]
        assert covering and all(ex.trained[t] for t in covering), (name, full[s:e])
    for s, e in never:
        assert not any(ex.trained[t] for t, (a, b) in enumerate(offsets) if a >= s and b <= e), (name, full[s:e])
    regions = [(spans[0][0], spans[-1][1]) for spans in turns]
    for t, (a, b) in enumerate(offsets):
        if ex.trained[t]:
            assert any(a < e and b > s for s, e in regions), (name, full[a:b])  # nothing outside assistant turns
            assert a >= first_user_end  # the tools block and the system text are context


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_shipped_templates_are_prefix_stable(tokenizer, name):
    template = template_text(name)
    messages, tools = row_to_chat(ROW, "auto", "f.jsonl", 1)
    render = lambda k, gen=False: tokenizer.apply_chat_template(messages[:k], tools=tools, tokenize=False,
                                                               chat_template=template, add_generation_prompt=gen)
    for k in range(1, len(messages)):
        assert render(k + 1).startswith(render(k)), (name, k)
        if messages[k]["role"] == "assistant":
            assert render(k + 1).startswith(render(k, gen=True)), (name, k)
    assert render_prompt(tokenizer, messages[:4], template, tools=tools) == render(4, gen=True)


def test_embedded_template_cannot_render_tools(tokenizer, tmp_path):
    messages, tools = row_to_chat(ROW, "auto", "f.jsonl", 1)
    with pytest.raises(TemplateError, match="does not render tool calls.*hermes-tools"):
        render_example(tokenizer, messages, tools=tools)
    with pytest.raises(TemplateError, match="does not render tool calls"):
        render_prompt(tokenizer, messages[:3], tools=tools)
    path = write_jsonl(tmp_path / "tools.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                                {"role": "assistant", "content": "hello"}]}, ROW])
    with pytest.raises(DataError, match="does not render tool calls") as err:
        build_examples(path, tokenizer, max_seq_len=2048)
    assert err.value.row == 2 and err.value.field == "messages"
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(TemplateError, match="does not render tool calls"):
        render_example(plain, messages, tools=tools)


def test_build_examples_with_a_shipped_template_by_name(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "tools.jsonl", [ROW])
    (ex,), kept, report = build_examples(path, tokenizer, max_seq_len=2048,
                                         chat_template=resolve_template("hermes-tools"))
    assert report.kept == 1 and ex.num_trained > 0 and kept[0][1][2]["tool_calls"]
    assert "get_weather" in tokenizer.decode(ex.input_ids)


def test_template_names_resolve_and_ship_as_package_data():
    import re
    from pathlib import Path

    import posttrain

    for name, file in TEMPLATES.items():
        assert resolve_template(name) == template_text(name)
        assert (Path(posttrain.__file__).parent / "data" / "templates" / file).is_file()
    pyproject = (Path(posttrain.__file__).parent.parent / "pyproject.toml").read_text()
    shipped = re.findall(r'"([^"]+)"', re.search(r"^posttrain = \[(.*)\]$", pyproject, re.MULTILINE).group(1))
    assert all(any(Path(f"data/templates/{f}").match(g) for g in shipped) for f in TEMPLATES.values())
    assert resolve_template("{{ messages }}") == "{{ messages }}"  # inline templates pass through
    from posttrain.errors import ConfigError
    from posttrain.rewards.model import run_template

    # a finished run's scorer renders with the template the run trained with, shipped by name or not
    assert run_template({"data": {"chat_template": "hermes-tools"}}) == template_text("hermes-tools")
    assert run_template({"data": {}}) is None
    with pytest.raises(ConfigError, match="no file 'gone.jinja'"):
        run_template({"data": {"chat_template": "gone.jinja"}})
    with pytest.raises(TemplateError, match="no shipped chat template"):
        template_text("hermes-tool")


def _row(*messages, tools=TOOLS):
    return {"messages": [{"role": "user", "content": "Weather in Oslo?"}, *messages], **({"tools": tools} if tools
                                                                                          else {})}


CALL = {"role": "assistant", "content": "", "tool_calls": [_call("a", "get_weather", "{\"city\": \"Oslo\"}")]}
RESULT = {"role": "tool", "tool_call_id": "a", "content": "sunny"}
DONE = {"role": "assistant", "content": "Sunny."}
TWO = {"role": "assistant", "content": "", "tool_calls": [_call("a", "get_weather", {"city": "Oslo"}),
                                                          _call("b", "local_time", {})]}


@pytest.mark.parametrize("row, field, problem", [
    (_row(CALL, {**RESULT, "tool_call_id": "zz"}, DONE), "messages[2].tool_call_id", "unknown tool_call_id 'zz'"),
    (_row({**CALL, "tool_calls": [_call("a", "get_weather", "{city: Oslo")]}, RESULT, DONE),
     "messages[1].tool_calls[0].function.arguments", "does not parse"),
    (_row({**CALL, "tool_calls": [_call("a", "get_weather", "[1, 2]")]}, RESULT, DONE),
     "messages[1].tool_calls[0].function.arguments", "must be a JSON object"),
    (_row(DONE, RESULT, DONE), "messages[2].role", "no tool call before it"),
    (_row(TWO, RESULT, DONE), "messages[1].tool_calls[1]", "tool call 'b' (local_time) has no tool result"),
    (_row({**TWO, "tool_calls": [TWO["tool_calls"][0], {**TWO["tool_calls"][1], "id": "a"}]}, RESULT, DONE),
     "messages[1].tool_calls[1].id", "duplicate tool call id 'a'"),
    (_row(CALL, RESULT, DONE, tools=[TOOLS[0], {"name": "local_time", "parameters": {}}]), "tools[1]",
     "not a function definition"),
    (_row({**CALL, "tool_calls": [_call("a", "get_news", "{}")]}, RESULT, DONE),
     "messages[1].tool_calls[0].function.name", "'get_news', which is not among the row's tools"),
    (_row({"role": "assistant", "content": ""}), "messages[1].content", "empty assistant turn"),
    (_row(CALL, RESULT, RESULT, DONE), "messages[3].tool_call_id", "a second result for tool call 'a'"),
    (_row(CALL, {**RESULT, "name": "local_time"}, DONE), "messages[2].name", "called 'get_weather'"),
    (_row(CALL, RESULT), "messages", "must end with an assistant turn"),
    (_row(CALL, DONE), "messages[1].tool_calls[0]", "has no tool result"),
    (_row(CALL, RESULT, {"role": "user", "content": "and?"}, DONE), "messages[3].role", "expected 'assistant'"),
    (_row({**CALL, "tool_calls": [{"id": "a", "type": "function", "function": {"name": "get_weather"}}]}, RESULT,
          DONE), "messages[1].tool_calls[0].function.arguments", "missing field"),
    (_row(CALL, {"role": "tool", "content": "sunny"}, DONE), "messages[2].tool_call_id", "missing field"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": CALL["tool_calls"]}, DONE]},
     "messages[0].tool_calls", "only assistant messages make tool calls"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "messages[0].role", "role must be one of"),
])
def test_tool_rows_are_validated_with_file_row_and_field(row, field, problem):
    with pytest.raises(DataError) as err:
        row_to_messages(row, "auto", "calls.jsonl", 7)
    assert (err.value.file, err.value.row, err.value.field) == ("calls.jsonl", 7, field)
    assert problem in err.value.problem


def test_tools_without_calls_and_calls_without_tools():
    assert row_to_messages(_row(DONE), "auto", "f", 1)[1]["content"] == "Sunny."
    messages = row_to_messages(_row({**CALL, "tool_calls": [_call("a", "anything", "{}")]}, RESULT, DONE,
                                    tools=None), "auto", "f", 1)
    assert messages[2]["name"] == "anything"  # with no tools given, any function name is accepted


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("content", ["", "Let me check."])
def test_parser_round_trips_the_rendered_call(tokenizer, name, content):
    template = template_text(name)
    style = template_style(template)
    assert style in STYLES
    msg = {"role": "assistant", "content": content,
           "tool_calls": [_call("call_1_0", "get_weather", {"city": "Oslo", "days": [1, 2]}),
                          _call("call_1_1", "local_time", {})]}
    chat = [{"role": "user", "content": "Weather?"}, msg]
    before = tokenizer.apply_chat_template(chat[:1], tools=TOOLS, tokenize=False, chat_template=template,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template(chat, tools=TOOLS, tokenize=False, chat_template=template)
    assert full.startswith(before)
    text = full[len(before):].rstrip("\n").removesuffix(END[name])
    assert parse_assistant(text, style, 1) == msg
    if style == "mistral":  # [TOOL_CALLS] is a control token that decoding may strip
        assert parse_assistant(text.replace("[TOOL_CALLS]", ""), style, 1) == msg


@pytest.mark.parametrize("style, text", [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": Oslo}}\n</tool_call>'),
    ("llama3", '{"name": "get_weather", "parameters": {"city": Oslo}}'),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": Oslo}}]'),
])
def test_parser_keeps_bad_arguments_as_raw_text(style, text):
    msg = parse_assistant(text, style, 3)
    (call,) = msg["tool_calls"]
    assert call["id"] == "call_3_0" and call["function"] == {"name": "get_weather", "arguments": '{"city": Oslo}'}
    assert parse_assistant("It is sunny.", style, 3) == {"role": "assistant", "content": "It is sunny."}


def test_template_style_refuses_a_template_without_tool_calls(tokenizer):
    with pytest.raises(TemplateError, match="<tool_call>.*TOOL_CALLS.*ipython"):
        template_style(tokenizer.chat_template)
    with pytest.raises(TemplateError, match="unknown tool-call style"):
        parse_assistant("x", "qwen", 0)


def test_cli_render_shows_a_tool_chat(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "tools.jsonl", [ROW])
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {data}, chat_template: hermes-tools, "
                   "max_seq_len: 2048}\n")
    assert main(["render", str(cfg), "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 tool calls" in out and "get_weather" in out and "tool_response" in out
    assert main(["render", str(cfg), "data.chat_template=null"]) == 2  # the model's own template: refused
    assert "does not render tool calls" in capsys.readouterr().err


def test_held_out_samples_offer_the_row_tools(tiny_dir, tokenizer, monkeypatch):
    """A held-out tool chat is sampled as it was trained: its tools offered, its tool results read."""
    import sys

    from transformers import AutoModelForCausalLM

    from posttrain.eval import sample_generations

    gen = sys.modules["posttrain.rollout.generate"]  # the module, which the package's ``generate`` function shadows

    rendered = []

    def spy(tok, chat, chat_template=None, tools=None):
        rendered.append(render_prompt(tok, chat, chat_template, tools))
        return rendered[-1]

    monkeypatch.setattr(gen, "render_prompt", spy)
    messages, tools = row_to_chat(ROW, "auto", "f.jsonl", 1)
    out = sample_generations(AutoModelForCausalLM.from_pretrained(tiny_dir), tokenizer, [messages],
                             tools=[tools], max_new_tokens=2, chat_template=template_text("hermes-tools"))
    assert out[0]["prompt"] == "Thanks!" and out[0]["reference"] == messages[-1]["content"]
    assert "local_time" in rendered[0] and "09:42 CET" in rendered[0]  # the tools section and the last result
    assert rendered[0].startswith(render_prompt(tokenizer, messages[:2], template_text("hermes-tools"), tools)[:200])


def test_a_prompt_may_end_in_a_tool_result():
    from posttrain.data.formats import row_to_prompt

    chat = row_to_prompt({"tools": TOOLS, "messages": ROW["messages"][:5]}, "p.jsonl", 3)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "tool", "tool"]
    with pytest.raises(DataError, match=r"p.jsonl.*row 3.*not among the row's tools"):
        row_to_prompt({"tools": TOOLS[:1], "messages": ROW["messages"][:5]}, "p.jsonl", 3)
