"""Assistant-only masks on three template styles, multi-turn chats, and a template that is not prefix-stable."""

import copy

import pytest

from posttrain.data import render_example

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Green, like grass."},
]


def trained_pieces(tok, ex):
    """Decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for t, on in zip(ex.input_ids, ex.trained):
        if on:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_chatml_single_turn_trains_content_and_end_of_turn(tokenizer):
    ex = render_example(tokenizer, CHAT[:3])
    assert trained_pieces(tokenizer, ex) == ["Blue.<|im_end|>"]
    # pad == eos here, yet the end-of-turn token is a target: the model learns to stop.
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert any(t == end and on for t, on in zip(ex.input_ids, ex.trained))


def test_chatml_multi_turn_trains_every_assistant_turn(tokenizer):
    ex = render_example(tokenizer, CHAT)
    assert trained_pieces(tokenizer, ex) == ["Blue.<|im_end|>", "Green, like grass.<|im_end|>"]
    assert tokenizer.decode(ex.input_ids).count("Name a colour.") == 1


def test_chatml_default_system_prompt_is_not_trained(tokenizer):
    ex = render_example(tokenizer, CHAT[1:3])  # SmolLM2's template inserts its own system prompt
    assert "SmolLM" in tokenizer.decode(ex.input_ids)
    assert trained_pieces(tokenizer, ex) == ["Blue.<|im_end|>"]


@pytest.fixture(scope="module")
def llama3_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def test_llama3_style_template(llama3_tokenizer):
    tok = llama3_tokenizer
    ex = render_example(tok, CHAT)
    assert trained_pieces(tok, ex) == ["Blue.<|eot_id|>", "Green, like grass.<|eot_id|>"]
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert ex.input_ids.count(eot) == 5
    assert sum(1 for t, on in zip(ex.input_ids, ex.trained) if t == eot and on) == 2


def test_template_passed_in_config_overrides_the_tokenizers(tokenizer):
    ex = render_example(tokenizer, CHAT[:3], chat_template=LLAMA3_TEMPLATE)
    # Without the special tokens registered the marker is several tokens; the text still matches exactly.
    assert trained_pieces(tokenizer, ex) == ["Blue.<|eot_id|>"]


def test_plain_prompt_completion_without_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    ex = render_example(tok, [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": " 4"}])
    assert tok.decode(ex.input_ids) == "2+2= 4" + tok.eos_token
    assert trained_pieces(tok, ex) == [" 4" + tok.eos_token]
    assert ex.input_ids[-1] == tok.eos_token_id and ex.trained[-1]


def test_template_that_rewrites_earlier_turns_uses_content_search(tokenizer):
    # This template renders a generation prompt differently from a finished turn ("<|im_start|>bot"),
    # so prefixes are not prefixes of the whole chat; the mask must still be exact.
    weird = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>bot\n{% endif %}")
    ex = render_example(tokenizer, CHAT, chat_template=weird)
    assert trained_pieces(tokenizer, ex) == ["Blue.<|im_end|>", "Green, like grass.<|im_end|>"]


def test_first_token_is_never_a_target(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    ex = render_example(tok, [{"role": "user", "content": ""}, {"role": "assistant", "content": "Hello"}])
    assert ex.trained[0] is False
