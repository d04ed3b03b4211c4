"""posttrain serve: an OpenAI-compatible server over one base and many LoRA adapters, batched in one forward.

A tiny random Llama (real SmolLM2 tokenizer) with two LoRA adapters whose B matrices are random, so each adapter
changes the outputs. The server runs in a thread on port 0 and is driven through the official `openai` client.
"""

import http.client
import json
import queue
import threading

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.serve import BASE, Request, Sampling, Server
from posttrain.serve.text import TextStream
from tests.helpers import make_adapter, make_tiny, new_engine

KEY = "test-key"
CHAT = [{"role": "user", "content": "Name three colours."}]



@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_dir, tokenizer):
    root = tmp_path_factory.mktemp("serve")
    served = root / "adapters"
    make_adapter(tiny_dir, served / "alpha", seed=1, targets="all-linear")
    make_adapter(tiny_dir, served / "run-beta" / "adapter", seed=2, targets=["q_proj", "v_proj"])  # a run folder
    make_adapter(tiny_dir, root / "outside", seed=3, targets="all-linear")
    narrow = make_tiny(root / "narrow-base", tokenizer, hidden=32)
    make_adapter(narrow, root / "narrow", seed=4, targets="all-linear")
    return root



@pytest.fixture(scope="module")
def server(adapters, tiny_dir):
    srv = Server(new_engine(tiny_dir), adapters / "adapters", port=0, api_key=KEY, batch_wait_s=0.02,
                 timeout_s=60)
    loaded, skipped = srv.load_adapter_dir()
    assert loaded == ["alpha", "run-beta"] and not skipped
    with srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def raw(server, method: str, path: str, body: bytes | None = None, key: str | None = KEY, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
            **(headers or {})}
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


def chat(client, model, max_tokens=12, **kw):
    return client.chat.completions.create(model=model, messages=CHAT, max_tokens=max_tokens, temperature=0, **kw)


# ---- batching ----

def test_burst_of_three_models_shares_one_forward_and_matches_each_alone(server, client):
    models = ["base", "alpha", "run-beta"]
    prompts = ["The sky is", "Once upon a time"]
    jobs = [(m, p) for m in models for p in prompts]
    results: dict = {}
    barrier = threading.Barrier(len(jobs))

    def go(job):
        c = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)
        barrier.wait()
        results[job] = c.completions.create(model=job[0], prompt=job[1], max_tokens=10, temperature=0)

    sched = server.scheduler
    sched.batch_wait_s, sched.max_batch = 2.0, len(jobs)  # admit the whole burst together
    server.engine.stats["max_adapters"] = 0
    try:
        threads = [threading.Thread(target=go, args=(j,)) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sched.batch_wait_s, sched.max_batch = 0.02, 16
    assert len(results) == len(jobs)
    assert server.engine.stats["max_adapters"] == 3  # base, alpha and beta rows in one forward
    for (model, prompt), burst in results.items():
        alone = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)
        assert burst.choices[0].text == alone.choices[0].text, (model, prompt)
        assert burst.usage.completion_tokens == alone.usage.completion_tokens == 10
        assert burst.model == model
    texts = {m: results[(m, prompts[0])].choices[0].text for m in models}
    assert len(set(texts.values())) == 3, texts  # the adapters really change the output


def test_mixed_batch_logits_equal_each_adapter_alone(adapters, tiny_dir):
    from peft import PeftModel

    engine = new_engine(tiny_dir)
    engine.load_adapter("alpha", adapters / "adapters" / "alpha")
    engine.load_adapter("beta", adapters / "adapters" / "run-beta" / "adapter")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (7, 3, 5, 9)]
    names = ["alpha", BASE, "beta", "alpha"]
    keys = [engine.adapters[n].key if n != BASE else BASE for n in names]
    with torch.no_grad():
        mixed, _, _ = engine.prefill(prompts, keys)
        for name, prompt, row in zip(names, prompts, mixed):
            model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
            if name != BASE:
                path = adapters / "adapters" / ("alpha" if name == "alpha" else "run-beta/adapter")
                model = PeftModel.from_pretrained(model, str(path)).eval()
            alone = model(input_ids=torch.tensor([prompt])).logits[0, -1]
            torch.testing.assert_close(row, alone, atol=1e-5, rtol=0)


def _request(engine, prompt: str, model: str, max_tokens: int) -> Request:
    ids = engine.tokenizer(prompt)["input_ids"]
    return Request(prompt_ids=ids, model=model, events=queue.Queue(),
                   sampling=Sampling(max_tokens=max_tokens, temperature=0))


def _text(req: Request) -> tuple[str, str]:
    events = []
    while not req.events.empty():
        events.append(req.events.get_nowait())
    assert events[-1][1] == "done"
    return "".join(d["text"] for _, k, d in events if k == "text"), events[-1][2]["finish_reason"]


def test_requests_joining_a_running_batch_decode_as_if_alone(adapters, tiny_dir):
    engine = new_engine(tiny_dir)
    engine.load_adapter("alpha", adapters / "adapters" / "alpha")
    specs = [("The sky is blue and", "alpha", 12), ("Hello", "base", 6), ("One two three four five six", "alpha", 9)]
    alone = []
    for spec in specs:
        req = _request(engine, *spec)
        engine.add([req], "base")
        while engine.rows:
            engine.step()
        alone.append(_text(req))
    reqs = [_request(engine, *spec) for spec in specs]
    engine.add(reqs[:1], "base")
    for _ in range(3):
        engine.step()
    engine.add(reqs[1:], "base")  # joins with a shorter and a longer prompt than the running row's cache
    while engine.rows:
        engine.step()
    assert [_text(r) for r in reqs] == alone
    assert engine.cache is None and engine.stats["max_rows"] == 3


# ---- streaming, stop and length ----

def test_streaming_chat_and_completions_concatenate_to_the_plain_answer(client):
    plain = chat(client, "alpha", max_tokens=16)
    stream = chat(client, "alpha", max_tokens=16, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason == "length" and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == 16

    plain = client.completions.create(model="run-beta", prompt="Water is", max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="run-beta", prompt="Water is", max_tokens=16, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_max_tokens_set_finish_reason(client):
    full = chat(client, "base", max_tokens=16).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    for stops in (stop, [stop, "never-appears"]):
        cut = chat(client, "base", max_tokens=16, stop=stops)
        assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    streamed = chat(client, "base", max_tokens=16, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    short = chat(client, "base", max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    # A list of prompts gets one choice each; seed makes sampling repeatable.
    two = client.completions.create(model="alpha", prompt=["a", "b c"], max_tokens=4, temperature=0.9, seed=7)
    again = client.completions.create(model="alpha", prompt=["a", "b c"], max_tokens=4, temperature=0.9, seed=7)
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.text for c in two.choices] == [c.text for c in again.choices]
    assert two.usage.completion_tokens == 8


def test_text_stream_holds_back_half_characters_and_stop_prefixes(tokenizer):
    text = "héllo wörld 世界 🎉🎉 end. STOP here"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    s = TextStream(tokenizer)
    pieces = [s.push(t)[0] for t in ids] + [s.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) and not any("\ufffd" in p for p in pieces)
    s = TextStream(tokenizer, stop=("STOP", "🎉x"))
    pieces = []
    for t in ids:
        piece, stopped = s.push(t)
        pieces.append(piece)
        if stopped:
            break
    assert stopped and "".join(pieces) == "héllo wörld 世界 🎉🎉 end. "


# ---- refusals ----

def test_bad_requests_get_openai_shaped_errors(server, client):
    status, body = raw(server, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="alpha", messages=[], max_tokens=2)
    assert exc.value.body["param"] == "messages"
    status, body = raw(server, "POST", "/v1/chat/completions", json.dumps({"model": "alpha"}).encode())
    assert status == 400 and body["error"]["param"] == "messages" and body["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, "alpha", n=65)
    assert exc.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, "alpha", max_tokens=100_000)
    assert exc.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="alpha", prompt="x", max_tokens=2, temperature=5)
    with pytest.raises(openai.NotFoundError):
        chat(client, "no-such-adapter")
    with pytest.raises(openai.AuthenticationError):
        chat(openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0), "alpha")
    assert raw(server, "GET", "/v1/models", key=None)[0] == 401
    assert raw(server, "GET", "/v1/nowhere")[0] == 404
    status, body = raw(server, "GET", "/v1/chat/completions")
    assert status == 405 and "POST" in body["error"]["message"]
    # Refused from the header alone, before the body is read (the connection is then closed).
    status, body = raw(server, "POST", "/v1/completions", b"{}",
                       headers={"Content-Length": str(server.max_body_bytes + 1)})
    assert status == 413 and "limit" in body["error"]["message"]
    status, body = raw(server, "GET", "/health", key=None)
    assert status == 200 and body["adapters"] == ["alpha", "run-beta"]


def test_adapter_paths_outside_the_directory_are_refused(server, adapters):
    inside = adapters / "adapters"
    link = inside / "escape"
    link.symlink_to(adapters / "outside", target_is_directory=True)
    try:
        for path in ("../outside", str(adapters / "outside"), "escape", "alpha/../../outside"):
            status, body = raw(server, "POST", "/v1/load_lora_adapter",
                               json.dumps({"lora_name": "evil", "lora_path": path}).encode())
            assert status == 403, (path, body)
            assert body["error"]["param"] == "lora_path"
    finally:
        link.unlink()
    status, body = raw(server, "POST", "/v1/load_lora_adapter", json.dumps({"lora_name": "x"}).encode())
    assert status == 400 and body["error"]["param"] == "lora_path"
    missing = json.dumps({"lora_name": "x", "lora_path": "nope"}).encode()
    assert raw(server, "POST", "/v1/load_lora_adapter", missing)[0] == 404
    assert "evil" not in [m.id for m in openai.OpenAI(base_url=server.url, api_key=KEY).models.list()]


def test_adapters_load_and_unload_at_run_time(server, client, adapters):
    import shutil

    shutil.copytree(adapters / "outside", adapters / "adapters" / "gamma")
    shutil.copytree(adapters / "narrow", adapters / "adapters" / "narrow")
    try:
        status, body = raw(server, "POST", "/v1/load_lora_adapter",
                           json.dumps({"lora_name": "gamma", "lora_path": "gamma"}).encode())
        assert status == 200, body
        assert [m.id for m in client.models.list()] == ["base", "alpha", "run-beta", "gamma"]
        assert chat(client, "gamma").choices[0].message.content != chat(client, "base").choices[0].message.content
        status, _ = raw(server, "POST", "/v1/load_lora_adapter",
                        json.dumps({"lora_name": "gamma", "lora_path": "alpha"}).encode())
        assert status == 409  # the name is taken
        status, body = raw(server, "POST", "/v1/load_lora_adapter",
                           json.dumps({"lora_name": "narrow", "lora_path": "narrow"}).encode())
        assert status == 400 and "size mismatch" in body["error"]["message"]  # another base's shapes
        shutil.copytree(adapters / "outside", adapters / "adapters" / "dpo-run" / "adapter")
        (adapters / "adapters" / "dpo-run" / "config.yaml").write_text("model:\n  init_adapter: runs/sft\n")
        status, body = raw(server, "POST", "/v1/load_lora_adapter",
                           json.dumps({"lora_name": "dpo", "lora_path": "dpo-run"}).encode())
        assert status == 400 and "runs/sft" in body["error"]["message"]  # would silently lack the SFT adapter
        shutil.copytree(adapters / "outside", adapters / "adapters" / "qlora-export")
        (adapters / "adapters" / "qlora-export" / "export_report.json").write_text('{"quantization": "nf4"}')
        status, body = raw(server, "POST", "/v1/load_lora_adapter",
                           json.dumps({"lora_name": "q", "lora_path": "qlora-export"}).encode())
        assert status == 400 and "--quantization nf4" in body["error"]["message"]  # trained on a 4-bit base
        status, _ = raw(server, "POST", "/v1/unload_lora_adapter", json.dumps({"lora_name": "gamma"}).encode())
        assert status == 200
        assert [m.id for m in client.models.list()] == ["base", "alpha", "run-beta"]
        with pytest.raises(openai.NotFoundError):
            chat(client, "gamma")
        assert raw(server, "POST", "/v1/unload_lora_adapter", json.dumps({"lora_name": "gamma"}).encode())[0] == 404
        assert chat(client, "alpha").choices[0].finish_reason in ("stop", "length")  # still serving
    finally:
        shutil.rmtree(adapters / "adapters" / "gamma")
        shutil.rmtree(adapters / "adapters" / "narrow")
        shutil.rmtree(adapters / "adapters" / "dpo-run", ignore_errors=True)
        shutil.rmtree(adapters / "adapters" / "qlora-export", ignore_errors=True)


def test_unloading_an_adapter_in_use_is_refused_and_the_last_unload_restores_the_base(adapters, tiny_dir):
    from posttrain.serve import ServeError

    engine = new_engine(tiny_dir)
    base = _request(engine, "The sky is", "base", 8)
    engine.add([base], "base")
    while engine.rows:
        engine.step()
    with pytest.raises(ServeError) as exc:  # an adapter from another base, loaded first: nothing left behind
        engine.load_adapter("narrow", adapters / "narrow")
    assert exc.value.status == 400 and engine.peft is None and engine.adapters == {}
    engine.load_adapter("alpha", adapters / "adapters" / "alpha")
    req = _request(engine, "The sky is", "alpha", 8)
    engine.add([req], "base")
    with pytest.raises(ServeError) as exc:
        engine.unload_adapter("alpha")
    assert exc.value.status == 409
    req.cancelled = True
    engine.step()
    engine.unload_adapter("alpha")
    assert engine.peft is None
    again = _request(engine, "The sky is", "base", 8)
    engine.add([again], "base")
    while engine.rows:
        engine.step()
    assert _text(again) == _text(base)


# ---- command line ----

def test_serve_command_parses_its_flags(tmp_path, monkeypatch):
    import argparse

    from posttrain.cli.serve import add_commands

    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command"))
    args = p.parse_args(["serve", "--adapter-dir", str(tmp_path), "--port", "0", "--max-batch", "4"])
    assert (args.model, args.host, args.port, args.served_name, args.max_batch, args.dtype, args.api_key) == \
           (None, "127.0.0.1", 0, "base", 4, "auto", None)
    assert callable(args.func)
    missing = p.parse_args(["serve", "--adapter-dir", str(tmp_path / "absent")])
    with pytest.raises(FileNotFoundError):
        args.func(missing)
