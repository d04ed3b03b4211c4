"""The golden run: `posttrain sft|dpo|reward|grpo|ppo` for 2 steps each on the tiny model, `posttrain plan` and
`posttrain data`, compared with what the code gave before the move to recipes/ (tests/golden/).

Numbers must agree to 1e-6 (relative or absolute) and everything else exactly. Timings and temporary paths are
left out. To re-record after a change that is meant to change the numbers:
    POSTTRAIN_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
and say why in the commit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from posttrain.cli import main
from tests.helpers import chat_rows, pair_rows, write_jsonl

GOLDEN = Path(__file__).parent / "golden"
RECORD = os.environ.get("POSTTRAIN_RECORD_GOLDEN") == "1"
TIMING = {"seconds", "elapsed_s", "tokens_per_s", "step_s", "samples_per_s", "rss_mb", "peak_rss_mb",
          "rss_after_model_load_mb", "time", "wall_s", "s_per_step", "rollout/sample_s", "rollout/sync_s",
          # the hf engine's train-inference mismatch is float rounding (~1e-6), which differs by CPU; its bound is
          # tested in test_rollout_engines
          "mismatch/abs_max", "mismatch/abs_mean", "mismatch/kl"}
COMMON = ["train.max_steps=2", "train.lr=1e-3", "train.micro_batch_size=2", "train.eval_every=2",
          "train.log_every=1"]


def _scrub(value, tmp: str, tiny: str):
    """Paths made relative to the run's temporary folder and the tiny model; timing fields dropped."""
    if isinstance(value, dict):
        return {k: _scrub(v, tmp, tiny) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_scrub(v, tmp, tiny) for v in value]
    if isinstance(value, str):
        return value.replace(tiny, "<tiny>").replace(tmp, "<tmp>")
    return value


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor a run saved: adapter/, critic/ and the heads beside them, keyed by file and name."""
    files = [f for sub in ("adapter", "critic") for f in sorted((out / sub).glob("*.safetensors"))]
    files += sorted(out.glob("*.safetensors"))
    return {f"{f.relative_to(out)}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def _run(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def golden_runs(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("golden")
    chats = write_jsonl(tmp / "chats.jsonl", chat_rows(10))
    pairs = write_jsonl(tmp / "pairs.jsonl", pair_rows(10))
    prompts = write_jsonl(tmp / "prompts.jsonl", [{"question": f"Say a number bigger than {i}.",
                                                   "answer": f"#### {i + 1}"} for i in range(10)])
    base = [f"model.name={tiny_dir}", "data.eval_fraction=0.2", *COMMON]
    jobs = {
        "sft": ["sft", *base, f"data.train={chats}", "eval_samples=0"],
        "dpo": ["dpo", *base, f"data.train={pairs}"],
        "reward": ["reward", *base, f"data.train={pairs}"],
        "grpo": ["grpo", *base, f"data.train={prompts}", "data.prompt_field=question", "grpo.group_size=2",
                 "grpo.prompts_per_step=2", "grpo.max_new_tokens=6"],
        "ppo": ["ppo", *base, f"data.train={prompts}", "data.prompt_field=question", "ppo.samples_per_prompt=2",
                "ppo.prompts_per_step=2", "ppo.max_new_tokens=6", f"ppo.reward_model={tmp / 'reward'}"],
    }
    configs = {m: tmp / f"{m}.yaml" for m in jobs}
    for m, path in configs.items():
        extra = ("rewards: [{name: length_penalty, options: {max_chars: 10, per_char: 0.1}}]\n"
                 "watch: [{name: regex, options: {pattern: '[0-9]'}}]\n")
        path.write_text(f"method: {m}\n" + (extra if m == "grpo" else ""))
    return tmp, {m: [argv[0], str(configs[m]), *argv[1:]] for m, argv in jobs.items()}


def _collect(method: str, tmp: Path, tiny: str) -> dict:
    out = tmp / method
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return _scrub({"metrics": metrics, "summary": summary}, str(tmp), tiny)


def _compare(got, want, where: str = "") -> list[str]:
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            return [f"{where}: keys {sorted(set(got) ^ set(want)) if isinstance(got, dict) else type(got)}"]
        return [e for k in want for e in _compare(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{where}: length {len(got) if isinstance(got, list) else type(got)} != {len(want)}"]
        return [e for i, (g, w) in enumerate(zip(got, want)) for e in _compare(g, w, f"{where}[{i}]")]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        ok = (math.isnan(want) and math.isnan(got)) or math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6)
        return [] if ok else [f"{where}: {got!r} != {want!r}"]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


def _check(name: str, got) -> None:
    path = GOLDEN / f"{name}.json"
    if RECORD:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        return
    errors = _compare(got, json.loads(path.read_text()), name)
    assert not errors, "\n".join(errors[:20])


@pytest.mark.parametrize("method", ["sft", "dpo", "reward", "grpo", "ppo"])
def test_two_steps_of_each_method_give_the_recorded_numbers_and_files(method, golden_runs, tiny_dir, capsys):
    tmp, jobs = golden_runs
    if method == "ppo" and not (tmp / "reward" / "summary.json").exists():
        _run([*jobs["reward"], f"output_dir={tmp / 'reward'}"], capsys)
    _run([*jobs[method], f"output_dir={tmp / method}"], capsys)
    _check(method, _collect(method, tmp, tiny_dir))
    weights, path = _tensors(tmp / method), GOLDEN / f"{method}.safetensors"
    if RECORD:
        save_file(weights, str(path))
        return
    want = load_file(str(path))
    assert set(weights) == set(want)
    for k, v in want.items():
        assert torch.allclose(weights[k], v, rtol=1e-6, atol=1e-6), f"{method} {k}: max diff " \
            f"{float((weights[k] - v).abs().max()):.3g}"


def test_plan_and_data_print_the_recorded_output(golden_runs, tiny_dir, capsys):
    tmp, _ = golden_runs
    outputs = {
        "plan_show": _run(["plan", f"{tiny_dir}/config.json", "--json"], capsys),
        "plan_show_text": _run(["plan", "show", f"{tiny_dir}/config.json", "--method", "qlora", "--r", "8"], capsys),
        "plan_cost": _run(["plan", "cost", "--prompt-tokens", "800", "--queries-per-day", "5000",
                           "--price-per-mtok", "0.5", "--training-cost", "40", "--json"], capsys),
        "plan_advise": _run(["plan", "advise", "--change", "behaviour", "--stability", "stable", "--goal", "prefer",
                             "--examples", "3000", "--vram", "24", "--model", f"{tiny_dir}/config.json", "--json"],
                            capsys),
        "data_audit": _run(["data", "audit", str(tmp / "prompts.jsonl"), "--field", "answer", "--json"], capsys),
        "data_dedup": _run(["data", "dedup", str(tmp / "chats.jsonl"), "--out", str(tmp / "dedup.jsonl"),
                            "--json"], capsys),
        "data_length_bias": _run(["data", "length-bias", str(tmp / "pairs.jsonl"), "--json"], capsys),
        "data_contamination": _run(["data", "contamination", "--train", str(tmp / "chats.jsonl"), "--eval",
                                    str(tmp / "pairs.jsonl"), "--n", "3", "--json"], capsys),
    }
    _check("plan_data", _scrub(outputs, str(tmp), tiny_dir))
