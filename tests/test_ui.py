"""posttrain ui: its JSON endpoints on a hand-written runs directory, who may reach it, the form's refusals, and the
pages in headless Chromium (the runs list, live curves with points, a chat answer from the serving engine, a run
started from the form that appears in the runs browser and finishes)."""

from __future__ import annotations

import http.client
import json
import os
import time
from pathlib import Path

import pytest

from posttrain.cli import main as cli_main
from posttrain.cli.ui import check_config, examples_dir
from posttrain.errors import ConfigError
from posttrain.ui import UI, browse, check_exposure
from posttrain.ui.launch import FormError, Launcher, code_in_config, refused_overrides
from tests.cdp import Browser, chromium_binary
from tests.helpers import chat_rows, make_adapter, write_jsonl


def _metrics(folder: Path, steps: int, start_loss: float = 2.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 0, "eval/loss": start_loss}] + \
        [{"step": s, "loss": start_loss / s, "lr": 1e-3, "grad_norm": 0.5 + 0.1 * s} for s in range(1, steps + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (folder / "config.yaml").write_text(f"method: sft\noutput_dir: {folder}\ntrain: {{lr: {start_loss / 1000}}}\n")


def fake_runs(root: Path) -> Path:
    """finished (summary.json), live (fresh metrics, no summary), dead (stale), a workflow's stage, and clutter."""
    _metrics(root / "done", 6)
    (root / "done" / "summary.json").write_text(json.dumps({
        "steps": 6, "seconds": 12.0, "eval_before": {"step": 0, "eval/loss": 2.0},
        "eval_after": {"step": 6, "eval/loss": 1.5}}))
    _metrics(root / "live", 4, start_loss=3.0)
    with open(root / "live" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a record being written: not read until its newline comes
    _metrics(root / "dead", 2)
    old = time.time() - 2 * browse.STALE_S
    for p in [root / "dead", *(root / "dead").iterdir()]:
        os.utime(p, (old, old))
    _metrics(root / "wf" / "sft", 3)
    (root / "notes").mkdir()
    return root


def get(ui: UI, path: str, headers: dict | None = None, method: str = "GET", body: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", ui.port, timeout=60)
    conn.request(method, path, body=body, headers={"Host": f"127.0.0.1:{ui.port}", **(headers or {})})
    res = conn.getresponse()
    data = res.read()
    conn.close()
    if res.getheader("Content-Type", "").startswith("application/json"):
        data = json.loads(data)
    return res.status, data, res


def post(ui: UI, path: str, obj, headers: dict | None = None):
    return get(ui, path, {"Content-Type": "application/json", **(headers or {})}, "POST", json.dumps(obj).encode())


@pytest.fixture
def plain_ui(tmp_path):
    ui = UI(fake_runs(tmp_path / "runs"), check_config, port=0, examples_dir=examples_dir()).start()
    yield ui
    ui.stop()


def test_the_ui_reads_the_run_folder_names_posttrain_runs_writes():
    from posttrain import runs

    assert (browse.CONFIG_FILE, browse.METRICS_FILE, browse.SUMMARY_FILE) == \
        (runs.CONFIG_FILE, runs.METRICS_FILE, runs.SUMMARY_FILE)


def test_runs_list_status_last_step_and_metrics_since(plain_ui):
    status, data, _ = get(plain_ui, "/api/runs")
    assert status == 200
    runs = {r["name"]: r for r in data["runs"]}
    assert set(runs) == {"done", "live", "dead", "wf/sft"}  # notes/ holds no run
    assert {n: r["status"] for n, r in runs.items()} == {"done": "finished", "live": "running", "dead": "failed",
                                                         "wf/sft": "running"}
    assert runs["live"]["last_step"] == 4 and runs["live"]["key_metric"] == "eval/loss"  # held-out first
    assert runs["done"]["method"] == "sft"

    status, data, _ = get(plain_ui, "/api/runs/live/metrics?since=2")
    assert status == 200 and [r["step"] for r in data["records"]] == [3, 4]  # the half-written step 5 is not
    assert data["records"][0]["loss"] == pytest.approx(1.0)
    status, data, _ = get(plain_ui, "/api/runs/wf/sft/metrics?since=-1")
    assert [r["step"] for r in data["records"]] == [0, 1, 2, 3]

    status, svg, res = get(plain_ui, "/api/runs/done/curves")
    assert status == 200 and res.getheader("Content-Type").startswith("text/html")
    points = svg.decode().split('<polyline points="')[1].split('"')[0].split()
    assert len(points) >= 6 and all(len(p.split(",")) == 2 for p in points)

    status, data, _ = get(plain_ui, "/api/runs/done/summary")
    assert "eval/loss" in data["evals_html"] and "1.5 (-0.5)" in data["evals_html"]
    assert data["config"].startswith("method: sft")

    for bad in ("/api/runs/nope/metrics", "/api/runs/../done/metrics", "/api/runs/%2e%2e/metrics"):
        assert get(plain_ui, bad)[0] == 404, bad
    assert get(plain_ui, "/api/runs/live/metrics?since=x")[0] == 400


def test_compare_two_runs_curves_and_evals_side_by_side(plain_ui):
    status, html, _ = get(plain_ui, "/api/compare?run=done&run=live")
    html = html.decode()
    assert status == 200 and html.count("<polyline") >= 2 and "train.lr" in html  # what differs
    assert "held-out evals" in html and "1.5 (-0.5)" in html
    status, data, _ = get(plain_ui, "/api/compare?run=done")
    assert status == 400 and "2 to 4 runs" in data["error"]["message"]


def test_chat_refusals_name_the_field_before_any_model_loads(plain_ui):
    status, data, _ = get(plain_ui, "/api/models")
    assert data["models"] == ["base"]  # no run under runs/ has an adapter
    status, data, _ = post(plain_ui, "/api/chat", {"model": "done", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and "neither 'base' nor a run with an adapter" in data["error"]["message"]
    status, data, _ = post(plain_ui, "/api/chat", {"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                                   "temperature": -1})
    assert status == 400 and data["error"]["param"] == "temperature"
    status, data, _ = post(plain_ui, "/api/chat", {"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                                   "n": 2})
    assert status == 400 and "one choice at a time" in data["error"]["message"]
    assert plain_ui.playground.engine is None  # every refusal came before the base was loaded


def test_a_host_beyond_loopback_needs_a_key(tmp_path, capsys):
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_exposure(host, None)
    check_exposure("0.0.0.0", "k")
    with pytest.raises(ConfigError, match="--host 0.0.0.0 makes the UI reachable from other machines.*--api-key"):
        check_exposure("0.0.0.0", None)
    assert cli_main(["ui", "--runs", str(tmp_path), "--host", "192.168.1.7"]) == 2
    assert "error: --host 192.168.1.7 makes the UI reachable" in capsys.readouterr().err


def test_api_key_login_cookie_json_posts_and_loopback_host(tmp_path):
    ui = UI(fake_runs(tmp_path / "runs"), check_config, port=0, api_key="s3cret").start()
    try:
        status, data, _ = get(ui, "/api/runs")
        assert status == 401 and data["error"]["code"] == "invalid_api_key"
        status, _, res = get(ui, "/compare")
        assert status == 303 and res.getheader("Location") == "/login"
        assert get(ui, "/login")[0] == 200 and get(ui, "/static/ui.js")[0] == 200
        assert get(ui, "/api/runs", {"Authorization": "Bearer s3cret"})[0] == 200
        assert get(ui, "/api/runs", {"Authorization": "Bearer s3cre"})[0] == 401
        assert post(ui, "/api/login", {"key": "nope"})[0] == 401
        status, _, res = post(ui, "/api/login", {"key": "s3cret"})
        cookie = res.getheader("Set-Cookie")
        assert status == 200 and "HttpOnly" in cookie and "SameSite=Strict" in cookie and "s3cret" not in cookie
        assert get(ui, "/api/runs", {"Cookie": cookie.split(";")[0]})[0] == 200
        # A cross-site form can only send form or text bodies; a DNS-rebinding page sends its own host name.
        status, data, _ = get(ui, "/api/launch", {"Authorization": "Bearer s3cret",
                                                  "Content-Type": "application/x-www-form-urlencoded"}, "POST", b"a=b")
        assert status == 415
        assert get(ui, "/api/runs", {"Authorization": "Bearer s3cret", "Host": "evil.example:80"})[0] == 403
    finally:
        ui.stop()


def test_the_form_refuses_code_paths_and_shows_the_clis_config_errors(tmp_path, capsys):
    runs = fake_runs(tmp_path / "runs")
    launcher = Launcher(runs, examples_dir(), check_config)
    assert launcher.examples()["sft-lora.yaml"] == "sft"

    def refusal(form) -> str:
        with pytest.raises(FormError) as info:
            launcher.prepare({"name": "new", "example": "grpo-gsm8k.yaml", **form})
        return str(info.value)

    for override, key in [("rewards=[{name: os:system}]", "rewards"), ("watch.0.name=evil:fn", "watch"),
                          ("env.name=pkg.mod:Env", "env"), ("rollout={vllm_python: /bin/sh}", "rollout.vllm_python"),
                          ("rollout.vllm_args=[--x]", "rollout.vllm_args"), ("output_dir=/tmp/x", "output_dir"),
                          ("method=ppo", "method")]:
        assert f"{key} cannot be set from the form" in refusal({"overrides": [override]}), override
    assert refused_overrides(["train.lr=1e-4", "rollout.engine=hf", "rewardsx=1"]) == []

    # The schema's own message, word for word what `posttrain grpo` prints for the same override.
    message = refusal({"overrides": ["train.lrr=1e-4"]})
    assert "train.lrr: unknown key. did you mean 'train.lr'?" in message
    assert cli_main(["grpo", str(examples_dir() / "grpo-gsm8k.yaml"), "train.lrr=1e-4"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"

    assert "already exists" in refusal({"name": "done"})
    assert "run name" in refusal({"name": "../up"})
    assert "not one of the example configs" in refusal({"example": "../pyproject.toml"})
    with pytest.raises(FormError, match="not inside the runs directory"):
        launcher.prepare({"name": "new", "config": "../elsewhere.yaml"})
    # A config file in the runs directory that names code itself is refused too.
    (runs / "coded.yaml").write_text("method: grpo\ndata: {train: x.jsonl}\nrewards: [{name: 'mypkg.mod:score'}]\n")
    with pytest.raises(FormError, match=r"rewards\[0\].name = 'mypkg.mod:score' is Python code"):
        launcher.prepare({"name": "new", "config": "coded.yaml"})
    assert code_in_config({"env": {"name": "tools"}, "rewards": [{"name": "gsm8k_answer"}]}) == []

    argv, cwd, folder = launcher.prepare({"name": "new", "example": "sft-lora.yaml",
                                          "overrides": ["train.max_steps=3", " "]})
    assert argv[1:] == ["-m", "posttrain", "sft", str(examples_dir() / "sft-lora.yaml"), "train.max_steps=3",
                        f"output_dir={runs / 'new'}"]
    assert cwd == examples_dir().parent and folder == runs / "new"


# ---- in the browser ----

@pytest.fixture(scope="module")
def live_ui(tiny_dir, tmp_path_factory):
    """The UI over a runs directory with hand-written runs, an adapter run on the tiny model (its chat base), a
    tiny SFT config and one whose data has a bad row."""
    tmp = tmp_path_factory.mktemp("ui")
    runs = fake_runs(tmp / "runs")
    make_adapter(tiny_dir, runs / "tuned" / "adapter", seed=3, targets=["q_proj", "v_proj"])
    (runs / "tuned" / "config.yaml").write_text(f"method: sft\nmodel: {{name: {tiny_dir}}}\n")
    data = write_jsonl(tmp / "train.jsonl", chat_rows(12))
    bad = write_jsonl(tmp / "bad.jsonl", [*chat_rows(2), {"messages": "not a list"}])
    (runs / "configs").mkdir()
    for name, path in (("tiny-sft", data), ("bad-data", bad)):
        (runs / "configs" / f"{name}.yaml").write_text(
            f"method: sft\nmodel: {{name: {tiny_dir}}}\ndata: {{train: {path}, eval_fraction: 0.25}}\n"
            "lora: {r: 4}\ntrain: {max_steps: 2, micro_batch_size: 2}\neval_samples: 0\n")
    ui = UI(runs, check_config, port=0, model=tiny_dir, examples_dir=examples_dir()).start()
    yield ui
    ui.launcher.stop_all()
    ui.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no chromium binary (as root, `make test` installs it with apt-get install chromium)")
    b = Browser(binary, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def _shot(browser: Browser, name: str) -> None:
    """A screenshot of the page when POSTTRAIN_UI_SHOTS names a folder (the README's pictures are made so)."""
    folder = os.environ.get("POSTTRAIN_UI_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.screenshot(Path(folder) / f"{name}.png")
        browser.send("Emulation.setDeviceMetricsOverride", session=True, width=browser.width, height=900,
                     deviceScaleFactor=1, mobile=False)


def test_browser_runs_page_lists_runs_and_a_run_page_draws_its_curves(live_ui, browser):
    browser.goto(live_ui.url + "/")
    names = browser.wait("[...document.querySelectorAll('#runs-table tr[data-run]')].map(r => r.dataset.run)")
    assert {"done", "live", "dead", "wf/sft", "tuned"} <= set(names)
    assert browser.js("document.querySelector('tr[data-run=done] .status').textContent") == "finished"
    _shot(browser, "runs")
    browser.goto(live_ui.url + "/run?name=live")
    points = browser.wait("document.querySelector('#curves polyline')?.getAttribute('points')")
    xy = [tuple(map(float, p.split(","))) for p in points.split()]
    assert len(xy) >= 4 and len({x for x, _ in xy}) == len(xy)  # one point per step, spread along the axis
    assert browser.js("document.getElementById('run-status').textContent") == "running"
    # The run writes on: the half-written step 5 is finished and step 6 follows; the open page redraws by itself.
    with open(live_ui.runs_dir / "live" / "metrics.jsonl", "a") as f:
        f.write('5}\n{"step": 6, "loss": 0.4}\n')
    more = browser.wait("(p => p.split(' ').length >= 6 && p)(document.querySelector('#curves polyline')"
                        ".getAttribute('points'))", timeout=20)
    assert more.split()[:len(xy)] != points.split()  # the y axis rescaled to the new points
    assert browser.js("document.getElementById('run-step').textContent").startswith(" step 6")
    browser.goto(live_ui.url + "/run?name=done")
    browser.wait("!!document.querySelector('#evals table')")
    _shot(browser, "run")
    browser.goto(live_ui.url + "/compare?run=done&run=live")
    browser.wait("document.querySelectorAll('#compare-out polyline').length >= 2")
    _shot(browser, "compare")
    assert browser.errors == []


def test_browser_chat_answers_from_the_base_and_from_a_runs_adapter(live_ui, browser):
    browser.goto(live_ui.url + "/chat")
    assert browser.wait("[...document.querySelectorAll('#chat-model option')].map(o => o.value)") == ["base", "tuned"]
    answers = {}
    for model in ("base", "tuned"):
        browser.js(f"document.getElementById('chat-model').value = '{model}';"
                   "document.getElementById('chat-model').dispatchEvent(new Event('change'));"
                   "document.getElementById('chat-max-tokens').value = '6';"
                   "document.getElementById('chat-input').value = 'Combine alpha and beta.';"
                   "document.getElementById('chat-submit').click()")
        answers[model] = browser.wait("document.querySelector('.msg.answer')?.textContent", timeout=60)
        assert f"{model} \u00b7 " in answers[model] and browser.js("document.getElementById('chat-error').hidden")
    assert answers["base"] != answers["tuned"]  # the adapter was applied
    _shot(browser, "chat")
    assert browser.errors == []


def test_browser_form_starts_a_run_that_appears_in_the_runs_browser_and_finishes(live_ui, browser):
    browser.goto(live_ui.url + "/launch")
    browser.wait("document.querySelectorAll('#launch-config option').length > 2")

    def submit(name: str, config: str, overrides: str) -> None:
        browser.js(f"document.getElementById('launch-name').value = '{name}';"
                   f"document.getElementById('launch-config').value = '{config}';"
                   f"document.getElementById('launch-overrides').value = {json.dumps(overrides)};"
                   "document.getElementById('launch-submit').click()")

    submit("refused", "configs/tiny-sft.yaml", "train.max_steps=2\nenv.name=x:Y")
    assert "env cannot be set from the form" in browser.wait(
        "!document.getElementById('launch-error').hidden && document.getElementById('launch-error').textContent")
    submit("tiny", "configs/tiny-sft.yaml", "train.max_steps=2\nlora.r=2")
    browser.wait("!!document.querySelector('[data-launch=tiny]')")
    submit("broken", "configs/bad-data.yaml", "")
    # The CLI's DataError, as it prints it: the file, the row and the field.
    error = browser.wait("document.querySelector('[data-launch=broken] .error')?.textContent", timeout=90)
    assert "bad.jsonl, row 3" in error and "messages" in error
    _shot(browser, "launch")
    browser.goto(live_ui.url + "/")
    browser.wait("!!document.querySelector('tr[data-run=tiny]')")
    status = browser.wait("(s => s !== 'running' && s)(document.querySelector('tr[data-run=tiny] .status')"
                          "?.textContent)", timeout=120)
    assert status == "finished", live_ui.launcher.launches["tiny"].state()["tail"]
    assert (live_ui.runs_dir / "tiny" / "adapter" / "adapter_config.json").is_file()
    assert browser.js("document.querySelector('tr[data-run=tiny] td.num').textContent") == "2"
    _shot(browser, "runs-after")
    browser.goto(live_ui.url + "/run?name=tiny")  # a real run's page: its loss curve and held-out evals
    browser.wait("!!document.querySelector('#curves polyline') && !!document.querySelector('#evals table')")
    _shot(browser, "run-tiny")
    assert browser.errors == []


def test_stop_ends_the_runs_process_group(live_ui):
    from posttrain.ui.launch import Launch

    launcher = live_ui.launcher
    launch = launcher.start({"name": "long", "config": "configs/tiny-sft.yaml",
                             "overrides": ["train.max_steps=100000"]})
    assert isinstance(launch, Launch) and launcher.alive("long")
    status, data, _ = post(live_ui, "/api/launches/long/stop", {})
    assert status == 200
    launch.proc.wait(30)
    assert post(live_ui, "/api/launches/nope/stop", {})[0] == 404
    assert launch.state()["status"] == "stopped" and launcher.alive("long") is False
    with pytest.raises(ProcessLookupError):
        os.killpg(launch.proc.pid, 0)  # nothing of the group is left
