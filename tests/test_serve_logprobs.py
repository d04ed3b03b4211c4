"""posttrain serve's vLLM completion extensions for RL rollouts: token-id prompts, n choices, min_tokens, per-token
logprobs (raw and processed), return_tokens_as_token_ids and return_token_ids.

The logprobs are checked against a teacher-forced forward of the same model on prompt + completion; a tiny model
whose EOS logit is raised by a hook makes the stop token likely, for min_tokens and finish_reason.
"""

import http.client
import json

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.models import load_tokenizer
from posttrain.serve import Engine, Server
from tests.helpers import make_adapter, new_engine

KEY = "lp-key"
PROMPT = [28120, 905, 314, 260, 1345]  # token ids, sent as they are (no BOS, no re-tokenizing)
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("serve-lp")
    make_adapter(tiny_dir, root / "alpha", seed=1, targets="all-linear")
    return root


def start(engine, adapter_dir) -> Server:
    srv = Server(engine, adapter_dir, port=0, api_key=KEY, batch_wait_s=0.02, timeout_s=60)
    srv.load_adapter_dir()
    return srv.start()


@pytest.fixture(scope="module")
def server(tiny_dir, adapter_dir):
    srv = start(new_engine(tiny_dir), adapter_dir)
    yield srv
    srv.stop()


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body: dict):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def teacher_forced(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    """(len(completion), V) log-probabilities the model gives each completion position, read in one forward."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def ids_of(tokens: list[str]) -> list[int]:
    assert all(t.startswith("token_id:") for t in tokens), tokens
    return [int(t.removeprefix("token_id:")) for t in tokens]


def check_completion_choices(resp, model, tokenizer, k: int, temperature: float = 1.0) -> None:
    """Every choice's logprobs equal the teacher-forced ones; ids from both extensions agree and decode to the text."""
    for c in resp.choices:
        lp = c.logprobs
        assert ids_of(lp.tokens) == c.token_ids and c.prompt_token_ids == PROMPT
        assert tokenizer.decode(c.token_ids, skip_special_tokens=True) == c.text
        ref = teacher_forced(model, PROMPT, c.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(lp.token_logprobs), ref[range(len(c.token_ids)), c.token_ids],
                                   atol=1e-4, rtol=0)
        for pos, (token, top) in enumerate(zip(c.token_ids, lp.top_logprobs)):
            best = ref[pos].topk(k)
            expected = {token, *best.indices.tolist()}
            assert list(top)[0] == f"token_id:{token}" and set(ids_of(list(top))) == expected  # sampled first
            for name, value in top.items():
                assert abs(value - ref[pos, int(name.removeprefix("token_id:"))].item()) < 1e-4
        offsets = [0]
        for t in lp.tokens[:-1]:
            offsets.append(offsets[-1] + len(t))
        assert lp.text_offset == offsets  # vLLM adds up the listed strings' lengths


# ---- logprobs equal a teacher-forced forward ----

def test_token_id_prompt_n2_raw_logprobs_equal_a_teacher_forced_forward(server, tiny_dir, tokenizer):
    resp = client_of(server).completions.create(
        model="base", prompt=PROMPT, n=2, max_tokens=10, temperature=1.0, seed=3, logprobs=4,
        extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True})
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[0].token_ids != resp.choices[1].token_ids  # two samples, not one twice
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    check_completion_choices(resp, model, tokenizer, k=4)
    # The prompt is counted once, however many choices it has (as OpenAI and vLLM).
    assert resp.usage.prompt_tokens == len(PROMPT) and resp.usage.completion_tokens == 20


def test_processed_logprobs_at_temperature_07_divide_the_logits(tiny_dir, adapter_dir, tokenizer):
    engine = Engine(AutoModelForCausalLM.from_pretrained(tiny_dir), load_tokenizer(tiny_dir),
                    logprobs_mode="processed_logprobs")
    srv = start(engine, adapter_dir)
    try:
        resp = client_of(srv).completions.create(
            model="base", prompt=PROMPT, n=2, max_tokens=8, temperature=0.7, seed=5, logprobs=2,
            extra_body={"return_tokens_as_token_ids": True, "return_token_ids": True})
    finally:
        srv.stop()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    check_completion_choices(resp, model, tokenizer, k=2, temperature=0.7)
    # And not the raw values, which a server in the default mode would report.
    c = resp.choices[0]
    raw = teacher_forced(model, PROMPT, c.token_ids)[range(len(c.token_ids)), c.token_ids]
    assert (torch.tensor(c.logprobs.token_logprobs) - raw).abs().max() > 1e-2


def test_chat_logprobs_shape_and_values(server, tiny_dir, tokenizer):
    resp = client_of(server).chat.completions.create(
        model="base", messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"return_token_ids": True})
    c = resp.choices[0]
    prompt = resp.prompt_token_ids  # vLLM puts the chat prompt's ids on the response
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    ref = teacher_forced(AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), prompt, c.token_ids)
    assert len(c.logprobs.content) == len(c.token_ids) == 8
    for pos, (entry, token) in enumerate(zip(c.logprobs.content, c.token_ids)):
        text = tokenizer.decode([token])
        assert entry.token == text and entry.bytes == list(text.encode("utf-8", "replace"))
        assert abs(entry.logprob - ref[pos, token].item()) < 1e-4
        # Greedy: the sampled token is the best, so vLLM's entries are exactly the top 3 in rank order.
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([i]) for i in ref[pos].topk(3).indices]
        assert entry.top_logprobs[0].logprob == entry.logprob


def test_adapter_logprobs_follow_the_adapter_not_the_base(server, tiny_dir, adapter_dir, tokenizer):
    from peft import PeftModel

    resp = client_of(server).completions.create(
        model="alpha", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11, logprobs=0,
        extra_body={"return_token_ids": True})
    c = resp.choices[0]
    assert [len(top) for top in c.logprobs.top_logprobs] == [1] * 8  # k = 0: the sampled token alone, as vLLM
    got = torch.tensor(c.logprobs.token_logprobs)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(adapter_dir / "alpha"))
    steps = range(len(c.token_ids))
    torch.testing.assert_close(got, teacher_forced(adapted.eval(), PROMPT, c.token_ids)[steps, c.token_ids],
                               atol=1e-4, rtol=0)
    assert (got - teacher_forced(base, PROMPT, c.token_ids)[steps, c.token_ids]).abs().max() > 1e-2


# ---- seeds, n, stop and min_tokens ----

def test_same_seed_same_response_and_the_n_choices_differ(server):
    body = {"model": "base", "prompt": [PROMPT, PROMPT[:3]], "n": 3, "max_tokens": 6, "temperature": 1.0,
            "seed": 42, "logprobs": 1, "return_token_ids": True}
    (s1, a), (s2, b) = post(server, "/v1/completions", body), post(server, "/v1/completions", body)
    assert s1 == s2 == 200
    assert [c["index"] for c in a["choices"]] == list(range(6))
    assert [c["prompt_token_ids"] for c in a["choices"]] == [PROMPT] * 3 + [PROMPT[:3]] * 3  # p * n + j
    assert [(c["text"], c["token_ids"], c["logprobs"]) for c in a["choices"]] == \
           [(c["text"], c["token_ids"], c["logprobs"]) for c in b["choices"]]
    first = [tuple(c["token_ids"]) for c in a["choices"][:3]]
    assert len(set(first)) == 3, first
    _, other = post(server, "/v1/completions", {**body, "seed": 43})
    assert [c["token_ids"] for c in other["choices"]] != [c["token_ids"] for c in a["choices"]]
    assert other["choices"][0]["token_ids"] == a["choices"][1]["token_ids"]  # both seeded 43 + 0 = 42 + 1


def test_stop_string_lists_tokens_through_the_one_that_completed_it(server, tokenizer):
    # Sampled with a seed: greedy decoding of the random model repeats one byte token, whose text is all U+FFFD.
    body = {"model": "base", "prompt": "The sky is", "max_tokens": 16, "temperature": 1.0, "seed": 1, "logprobs": 0,
            "return_token_ids": True}
    _, full = post(server, "/v1/completions", body)
    ids, text = full["choices"][0]["token_ids"], full["choices"][0]["text"]
    assert full["choices"][0]["finish_reason"] == "length" and len(ids) == 16
    stop = text[len(text) // 2:len(text) // 2 + 2]
    m = next(m for m in range(1, 17) if stop in tokenizer.decode(ids[:m], skip_special_tokens=True))
    _, cut = post(server, "/v1/completions", {**body, "stop": stop})
    c = cut["choices"][0]
    assert c["finish_reason"] == "stop" and c["text"] == text[:text.index(stop)]
    assert m < 16 and c["token_ids"] == ids[:m] and len(c["logprobs"]["tokens"]) == m
    assert cut["usage"]["completion_tokens"] == m


@pytest.fixture(scope="module")
def eos_server(tiny_dir, adapter_dir):
    """The tiny model with +12 on EOS's logit: about 77% of the mass at temperature 1 (e^12 against 49k tokens
    near 0), and greedy decoding stops at once."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = load_tokenizer(tiny_dir)
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 12.0
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    srv = start(Engine(model, tok, logprobs_mode="processed_logprobs"), adapter_dir)
    yield srv
    srv.stop()


def test_min_tokens_holds_back_the_stop_token_and_finish_reasons(eos_server, tokenizer):
    eos = tokenizer.eos_token_id
    base = {"model": "base", "prompt": PROMPT, "temperature": 0, "logprobs": 2, "return_token_ids": True}
    _, now = post(eos_server, "/v1/completions", {**base, "max_tokens": 5})
    c = now["choices"][0]
    # The stop token is listed, as vLLM does, but is not in the text.
    assert c["finish_reason"] == "stop" and c["token_ids"] == [eos] and c["text"] == ""
    assert c["logprobs"]["tokens"] == [tokenizer.decode([eos])]
    _, later = post(eos_server, "/v1/completions", {**base, "max_tokens": 5, "min_tokens": 3})
    c = later["choices"][0]
    assert c["finish_reason"] == "stop" and len(c["token_ids"]) == 4 and c["token_ids"][-1] == eos
    assert eos not in c["token_ids"][:3]
    # processed_logprobs read the masked distribution: EOS is no alternative while it is held back.
    assert all(tokenizer.decode([eos]) not in top for top in c["logprobs"]["top_logprobs"][:3])
    _, capped = post(eos_server, "/v1/completions", {**base, "max_tokens": 3, "min_tokens": 3})
    c = capped["choices"][0]
    assert c["finish_reason"] == "length" and len(c["token_ids"]) == 3 and eos not in c["token_ids"]
    # Sampled: no choice has the stop token before min_tokens; most stop right after.
    _, sampled = post(eos_server, "/v1/completions", {**base, "temperature": 1.0, "seed": 0, "n": 8,
                                                      "max_tokens": 12, "min_tokens": 4})
    lengths = []
    for c in sampled["choices"]:
        assert eos not in c["token_ids"][:4]
        lengths.append(len(c["token_ids"]))
        assert (c["finish_reason"] == "stop") == (c["token_ids"][-1] == eos)
    assert lengths.count(5) >= 4, lengths


# ---- refusals name their field ----

@pytest.mark.parametrize("path,extra,param", [
    ("/v1/completions", {"prompt": [[1, 2], [3, 49152]]}, "prompt[1][1]"),
    ("/v1/completions", {"prompt": [5, -1]}, "prompt[1]"),
    ("/v1/completions", {"prompt": [5, True]}, "prompt[1]"),
    ("/v1/completions", {"prompt": [[1], []]}, "prompt[1]"),
    ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"n": 65}, "n"),
    ("/v1/completions", {"n": 1.5}, "n"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", {"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ("/v1/completions", {"min_tokens": -1}, "min_tokens"),
    ("/v1/completions", {"logprobs": 1, "stream": True}, "logprobs"),
    ("/v1/completions", {"return_token_ids": True, "stream": True}, "return_token_ids"),
    ("/v1/completions", {"return_tokens_as_token_ids": "yes"}, "return_tokens_as_token_ids"),
    ("/v1/chat/completions", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "stream": True}, "logprobs"),
    ("/v1/chat/completions", {"n": 100}, "n"),
    ("/v1/completions", {"stop_token_ids": [10 ** 9]}, "stop_token_ids[0]"),
    ("/v1/completions", {"stop_token_ids": 5}, "stop_token_ids"),
])
def test_new_refusals_name_their_field(server, path, extra, param):
    body = {"model": "base", "max_tokens": 4, **({"messages": CHAT} if "chat" in path else {"prompt": PROMPT}),
            **extra}
    status, data = post(server, path, body)
    assert status == 400 and data["error"]["param"] == param, data
    assert param.split("[")[0] in data["error"]["message"]


def test_stop_token_ids_end_a_choice_and_min_tokens_holds_them_back(server):
    """vLLM's stop_token_ids: the greedy answer's third token, made a stop token, ends the answer there (listed,
    finish_reason stop); with min_tokens 4 it cannot be sampled before the fourth position."""
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 0,
            "return_tokens_as_token_ids": True}
    status, free = post(server, "/v1/completions", body)
    assert status == 200
    greedy = ids_of(free["choices"][0]["logprobs"]["tokens"])
    stop = greedy[2]
    status, cut = post(server, "/v1/completions", {**body, "stop_token_ids": [stop]})
    first = greedy.index(stop)
    assert ids_of(cut["choices"][0]["logprobs"]["tokens"]) == greedy[:first + 1]
    assert cut["choices"][0]["finish_reason"] == "stop"
    status, held = post(server, "/v1/completions", {**body, "stop_token_ids": [stop], "min_tokens": first + 2})
    assert stop not in ids_of(held["choices"][0]["logprobs"]["tokens"])[:first + 2]


def test_token_id_prompts_are_used_as_they_are(server, tokenizer):
    """A token-id prompt decodes as the text prompt whose ids it is: same greedy answer, no BOS added."""
    text = "The sky is"
    ids = tokenizer(text)["input_ids"]
    _, by_text = post(server, "/v1/completions", {"model": "base", "prompt": text, "max_tokens": 6,
                                                  "temperature": 0, "return_token_ids": True})
    _, by_ids = post(server, "/v1/completions", {"model": "base", "prompt": [ids, [7] + ids], "max_tokens": 6,
                                                 "temperature": 0, "return_token_ids": True})
    assert by_ids["choices"][0]["prompt_token_ids"] == ids == by_text["choices"][0]["prompt_token_ids"]
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    assert by_ids["choices"][1]["prompt_token_ids"] == [7] + ids
    assert by_ids["usage"]["prompt_tokens"] == 2 * len(ids) + 1


def test_serve_command_takes_vllms_logprobs_mode_flag(tmp_path):
    import argparse

    from posttrain.cli.serve import add_commands

    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command"))
    assert p.parse_args(["serve", "--adapter-dir", str(tmp_path)]).logprobs_mode == "raw_logprobs"
    args = p.parse_args(["serve", "--adapter-dir", str(tmp_path), "--logprobs-mode", "processed_logprobs"])
    assert args.logprobs_mode == "processed_logprobs"
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--adapter-dir", str(tmp_path), "--logprobs-mode", "raw_logits"])
