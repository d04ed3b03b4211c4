"""The thinking format: the format reward, the answer read after the block, the thinking's token budget, and chat
templates that rewrite assistant turns (Qwen3-style dropped <think> blocks) reported, never silently trained."""

import copy

import pytest

from posttrain.config import load_config
from posttrain.data import build_examples, render_example
from posttrain.errors import DataError
from posttrain.rewards.functions import REWARD_FUNCTIONS, gsm8k_answer, regex_match
from posttrain.rewards.thinking import strip_think, think_budget, think_format, think_tokens
from tests.helpers import write_jsonl

GOLD = "#### 18"


def test_think_format_each_case():
    cases = {
        "<think>9*2 = 18</think>#### 18": 1.0,
        "  <think>\nfine\n</think>\n\nThe answer is 18.\n": 1.0,  # surrounding whitespace is no text
        "<think>9*2 = 18, and so on": 0.0,  # unclosed
        "<think>a</think>b<think>c</think>d": 0.0,  # two blocks
        "<think>a</think>b</think>c": 0.0,  # a second closing tag
        "<think><think>a</think>b": 0.0,  # nested opening tag
        "<think>9*2 = 18</think>   ": 0.0,  # answer missing
        "<think> \n</think>18": 0.0,  # nothing inside
        "So: <think>a</think>18": 0.0,  # text before the block
        "#### 18": 0.0,  # no block
    }
    assert think_format([""] * len(cases), list(cases)) == list(cases.values())


def test_think_format_custom_and_prefilled_tags():
    assert think_format(["", ""], ["<r>x</r>y", "<think>x</think>y"], open="<r>", close="</r>") == [1.0, 0.0]
    # the generation prompt opened the block: the completion starts inside it
    assert think_format(["", "", ""], ["x</think>y", "</think>y", "x y"], open="") == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="closing tag"):
        think_format([""], ["x"], close="")


def test_strip_think_reads_after_the_last_closing_tag():
    assert strip_think("<think>a</think> answer") == " answer"
    assert strip_think("<think>a</think>b</think>c") == "c"
    assert strip_think("no block, 18") == "no block, 18"
    assert strip_think("<think>still thinking 18") == ""  # unclosed: no answer
    assert strip_think("still thinking", open="") == ""  # prefilled and unclosed
    assert strip_think("[t]a[/t]b", open="[t]", close="[/t]") == "b"


def test_gsm8k_answer_after_think_ignores_numbers_inside_the_block():
    completions = ["<think>maybe #### 18</think>#### 17",  # right number only inside the thinking
                   "<think>maybe #### 17</think>#### 18",
                   "<think>#### 18",  # unclosed: no answer
                   "#### 18"]  # no block: the whole text is the answer
    assert gsm8k_answer([""] * 4, completions, answer=[GOLD] * 4, after_think=True) == [0.0, 1.0, 0.0, 1.0]
    assert gsm8k_answer([""] * 4, completions, answer=[GOLD] * 4) == [1.0, 0.0, 1.0, 1.0]  # reads the first ####
    assert gsm8k_answer([""], ["<t>#### 1</t> it is 18"], answer=[GOLD], strict=False,
                        after_think=["<t>", "</t>"]) == [1.0]
    assert regex_match(["", ""], ["<think>#### 4</think>four", "<think>x</think>#### 4"], after_think=True) == [
        0.0, 1.0]
    assert REWARD_FUNCTIONS["think_format"] is think_format and REWARD_FUNCTIONS["think_budget"] is think_budget


def test_think_budget_counts_the_thinking_tokens(tokenizer, embedded_dir):
    # '<think>a b c d e f g h</think>' is 14 tokens: '<' 'think' '>' 'a' ' b' ... ' h' '</' 'think' '>'
    long = "<think>a b c d e f g h</think>" + " the answer is 4" * 5
    assert think_tokens(long, 40, tokenizer) == 14
    assert think_tokens(long, 10, tokenizer) == 10  # never more than the completion generated
    assert think_tokens("<think>a b c", 7, tokenizer) == 7  # unclosed: the whole completion, exactly
    assert think_tokens("just 4", 3, tokenizer) == 0
    # '<think>2+2 is 4</think>' is 12 tokens. Budget 12, cache 4: 0 up to 8, then (8 - n) / 4, -1 beyond 12.
    completions = ["<think>2+2 is 4</think>4", long, "<think>a b c", "4"]
    got = think_budget([""] * 4, completions, completion_tokens=[13, 40, 10, 1], max_tokens=12, cache=4,
                       tokenizer=embedded_dir)
    assert got == pytest.approx([(8 - 12) / 4, -1.0, (8 - 10) / 4, 0.0])
    with pytest.raises(ValueError, match="tokenizer"):
        think_budget([""], ["x"], completion_tokens=[1], max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        think_budget([""], ["x"], completion_tokens=[1], tokenizer=embedded_dir)


def test_grpo_config_gives_think_budget_the_policys_tokenizer():
    base = {"rewards": [{"name": "think_budget", "options": {"max_tokens": 64}}]}
    cfg = load_config(None, ["data.train=x.jsonl", "model.name=some/model"], method="grpo", base=base)
    assert cfg.rewards[0].options == {"max_tokens": 64, "tokenizer": "some/model"}


# Strips the <think> block from every assistant turn but the last, as Qwen3's template does for turns before the
# last user message.
STRIP_EARLIER = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last and '</think>' in m['content'] %}"
    "{{ m['content'].split('</think>')[-1].lstrip() }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Adds an empty block to a final turn that has none, as Qwen3's does.
ADD_EMPTY = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last and '<think>' not in m['content'] %}<think>\n\n</think>\n\n"
    "{% endif %}{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "<think>red or blue</think>Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "<think>grass</think>Green."},
]


def trained_text(tok, ex):
    return tok.decode([t for t, on in zip(ex.input_ids, ex.trained) if on])


@pytest.fixture(scope="module")
def stripping(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = STRIP_EARLIER
    return tok


def test_embedded_template_keeps_think_blocks_no_report(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": CHAT}])
    (ex,), _, report = build_examples(path, tokenizer, max_seq_len=256)
    assert ex.rewritten == [] and report.rewritten == []
    both = "<think>red or blue</think>Blue.<|im_end|><think>grass</think>Green.<|im_end|>"
    assert trained_text(tokenizer, ex) == both


def test_dropped_think_block_is_refused_naming_file_row_and_message(tmp_path, stripping):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": CHAT[:2]}, {"messages": CHAT}])
    with pytest.raises(DataError) as err:
        build_examples(path, stripping, max_seq_len=256)
    assert (err.value.row, err.value.field) == (2, "messages")
    msg = str(err.value)
    assert "t.jsonl, row 2" in msg and "messages[1] (assistant)" in msg
    assert "dropped its thinking block '<think>red or blue</think>'" in msg and "data.rewritten_turns: mask" in msg


def test_mask_trains_only_the_turns_rendered_verbatim_and_reports_them(tmp_path, stripping):
    path = write_jsonl(tmp_path / "t.jsonl", [{"messages": CHAT[:2]}, {"messages": CHAT}])
    with pytest.warns(UserWarning, match=r"t.jsonl: .* 1 rows.*row 2: messages\[1\]: the template dropped"):
        (one, two), _, report = build_examples(path, stripping, max_seq_len=256, rewritten_turns="mask")
    assert trained_text(stripping, one) == "<think>red or blue</think>Blue.<|im_end|>"  # a final turn: kept
    assert trained_text(stripping, two) == "<think>grass</think>Green.<|im_end|>"
    assert "Blue." in stripping.decode(two.input_ids)  # the rewritten turn stays as context
    assert [r for r, _ in report.rewritten] == [2]
    assert "1 with assistant turns the chat template rewrote, left out of the loss (rows 2; row 2:" in report.summary()


def test_added_text_and_whole_rewrites_are_detected(tokenizer):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]
    ex = render_example(tokenizer, turns, chat_template=ADD_EMPTY, rewritten="mask")
    # 17 characters: '<think>' 7, two newlines 2, '</think>' 8
    assert ex.rewritten == [(1, "the template added '<think>\\n\\n</think>' (17 characters) before its content")]
    assert not any(ex.trained)
    upper = ADD_EMPTY.replace("{{ m['content'] }}", "{{ m['content'] | upper }}")
    ex = render_example(tokenizer, CHAT[:2], chat_template=upper, rewritten="mask")
    assert ex.rewritten == [(1, "the template rewrote its content (it does not appear verbatim in the rendered "
                                "chat)")]
    # outer whitespace a template trims (Llama 3's) is no rewrite
    trim = STRIP_EARLIER.replace("{{ m['content'] }}{% endif %}", "{{ m['content'] | trim }}{% endif %}")
    ex = render_example(tokenizer, [turns[0], {"role": "assistant", "content": "Hello.\n"}], chat_template=trim,
                        rewritten="error")
    assert ex.rewritten == [] and trained_text(tokenizer, ex) == "Hello.<|im_end|>"


def test_sft_config_takes_the_policy():
    assert load_config(None, ["data.train=x.jsonl"], method="sft").data.rewritten_turns == "error"
    cfg = load_config(None, ["data.train=x.jsonl", "data.rewritten_turns=mask"], method="sft")
    assert cfg.data.rewritten_turns == "mask"
