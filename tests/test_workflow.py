"""`posttrain run`: stages in order, cached by content hash, resumed after a failure, blocked by a gate."""

import json
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from tests.helpers import chat_rows, write_jsonl


def pair_rows(n: int):
    return [{"prompt": f"Say a word (#{i}).", "chosen": "alpha", "rejected": "omega omega"} for i in range(n)]


def write_workflow(tmp: Path, tiny_dir: str, **changes) -> Path:
    data = write_jsonl(tmp / "cards.jsonl", chat_rows(30))
    pairs = write_jsonl(tmp / "pairs.jsonl", pair_rows(8))
    wf = {
        "name": "tiny", "output_dir": str(tmp / "wf"), "model": tiny_dir,
        "eval_set": {"split": data, "fraction": 0.2},
        "baseline": {"system_prompt": "Answer briefly."},
        "evals": {"heldout": {"kind": "loss", "data": "${eval_set}"},
                  "prefs": {"kind": "preference", "data": pairs}},
        "stages": [
            {"name": "sft", "train": "sft", "config": {
                "data": {"train": "${train_set}", "eval": "${eval_set}"}, "lora": {"r": 4}, "eval_samples": 0,
                "train": {"max_steps": 3, "micro_batch_size": 2, "lr": 1e-2, "save_every": 1}}},
            {"name": "gate_sft", "gate": {"candidate": "sft", "rules": [
                {"metric": "heldout/loss", "max_regression": 100.0}]}},
            {"name": "dpo", "train": "dpo", "init_from": "sft", "config": {
                "data": {"train": pairs, "eval": pairs}, "lora": {"r": 4},
                "train": {"max_steps": 2, "micro_batch_size": 2}}},
            {"name": "gate_dpo", "gate": {"candidate": "dpo", "baseline": "sft", "rules": [
                {"metric": "prefs/accuracy", "max_regression": 1.0}]}},
            {"name": "export", "export": "dpo"},
        ],
    }
    for key, value in changes.items():
        wf[key] = value
    path = tmp / "workflow.yaml"
    path.write_text(yaml.safe_dump(wf, sort_keys=False))
    return path


def statuses(tmp: Path) -> dict[str, str]:
    return {s["name"]: s["status"] for s in json.loads((tmp / "wf" / "workflow.json").read_text())["stages"]}


@pytest.fixture(scope="module")
def done(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wf")
    path = write_workflow(tmp, tiny_dir)
    assert main(["run", str(path)]) == 0
    return tmp, path


def test_runs_every_stage_and_writes_the_report(done):
    tmp, _ = done
    assert statuses(tmp) == {"eval_set": "ran", "baseline": "ran", "sft": "ran", "gate_sft": "passed", "dpo": "ran",
                             "gate_dpo": "passed", "export": "ran"}
    summary = json.loads((tmp / "wf" / "workflow.json").read_text())
    assert summary["evals"]["columns"] == ["baseline", "sft", "dpo"]
    assert set(summary["evals"]["rows"]) >= {"heldout/loss", "heldout/ppl", "prefs/accuracy"}
    assert [g["passed"] for g in summary["gates"]] == [True, True]
    held = (tmp / "wf" / "data" / "eval.jsonl").read_text().splitlines()
    assert len(held) == 6 and summary["eval_set_sha256"]  # 20% of 30, hashed
    assert (tmp / "wf" / "report.html").exists() and (tmp / "wf" / "export" / "adapter_config.json").exists()
    dpo_cfg = yaml.safe_load((tmp / "wf" / "dpo" / "config.yaml").read_text())
    assert dpo_cfg["model"]["init_adapter"] == str(tmp / "wf" / "sft")  # DPO starts from the SFT stage


def test_the_export_carries_a_card_of_the_whole_chain(done):
    """SFT -> DPO -> export: both stages, the gate verdicts and the contamination check, from the workflow's state."""
    tmp, _ = done
    card = (tmp / "wf" / "export" / "README.md").read_text()
    summary = json.loads((tmp / "wf" / "workflow.json").read_text())
    assert "SFT (LoRA) → DPO (LoRA) → PEFT adapter" in card
    assert "### Gate gate_sft: PASSED (sft vs baseline)" in card and "### Gate gate_dpo: PASSED (dpo vs sft)" in card
    assert f"(sha256 {summary['eval_set_sha256']}): none: no held-out row shares" in card
    assert summary["contamination"].startswith("none") and summary["suites"]["heldout"]["data"] == summary["eval_set"]
    loss = summary["evals"]["rows"]["heldout/loss"]
    row = next(line for line in card.splitlines() if line.startswith("| heldout/loss |"))
    assert row.split(" | ")[1:3] == ["in-domain (held-out set)", "no"]
    assert [float(x) for x in row.strip(" |").split(" | ")[3:]] == \
        pytest.approx([loss["baseline"], loss["sft"], loss["dpo"]], rel=1e-5)


def test_rerun_is_all_cached(done, monkeypatch):
    import posttrain.recipes.dpo
    import posttrain.recipes.sft
    import posttrain.workflow

    tmp, path = done

    def boom(*a, **k):
        raise AssertionError("a cached stage was recomputed")

    monkeypatch.setattr(posttrain.recipes.sft, "run", boom)
    monkeypatch.setattr(posttrain.recipes.dpo, "run", boom)
    monkeypatch.setattr(posttrain.workflow, "run_suite", boom)
    assert main(["run", str(path)]) == 0
    st = statuses(tmp)
    assert st["baseline"] == st["sft"] == st["dpo"] == st["export"] == "cached"


def test_a_change_recomputes_only_what_depends_on_it(done, monkeypatch):
    import posttrain.recipes.dpo
    import posttrain.recipes.sft

    tmp, path = done
    wf = yaml.safe_load(path.read_text())
    wf["stages"][2]["overrides"] = ["dpo.beta=0.2"]  # the DPO stage changes; SFT and the baseline do not
    path.write_text(yaml.safe_dump(wf))

    def no_sft(*a, **k):
        raise AssertionError("SFT was recomputed")

    monkeypatch.setattr(posttrain.recipes.sft, "run", no_sft)
    assert main(["run", str(path)]) == 0
    st = statuses(tmp)
    assert (st["sft"], st["dpo"], st["export"]) == ("cached", "ran", "ran")
    assert yaml.safe_load((tmp / "wf" / "dpo" / "config.yaml").read_text())["dpo"]["beta"] == 0.2


def test_a_failed_stage_resumes_from_its_checkpoint(tiny_dir, tmp_path, monkeypatch):
    import posttrain.recipes.dpo
    import posttrain.recipes.sft

    path = write_workflow(tmp_path, tiny_dir)
    real_save, real_loop = posttrain.recipes.sft.save_trained, posttrain.recipes.sft.train_loop

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(posttrain.recipes.sft, "save_trained", crash)  # after the loop wrote checkpoints 1..3
    with pytest.raises(RuntimeError, match="disk full"):
        main(["run", str(path)])
    assert statuses(tmp_path)["sft"] == "failed"
    assert json.loads((tmp_path / "wf" / "sft" / "stage.json").read_text())["status"] == "running"
    resumed = []

    def loop(*a, resume=False, **k):
        resumed.append(resume)
        return real_loop(*a, resume=resume, **k)

    monkeypatch.setattr(posttrain.recipes.sft, "save_trained", real_save)
    monkeypatch.setattr(posttrain.recipes.sft, "train_loop", loop)
    assert main(["run", str(path)]) == 0
    # the loop got the checked start of a resume (engine.resume.RunStart), with the checkpoint it continues from
    assert statuses(tmp_path)["sft"] == "resumed" and resumed[0].checkpoint is not None


def test_a_gate_blocks_with_exit_1_and_the_next_stages_do_not_run(tiny_dir, tmp_path, capsys):
    path = write_workflow(tmp_path, tiny_dir)
    wf = yaml.safe_load(path.read_text())
    wf["stages"][1]["gate"]["rules"] = [{"metric": "heldout/loss", "min_lift": 1000.0},
                                       {"metric": "heldout/missing", "max_regression": 0.1}]
    path.write_text(yaml.safe_dump(wf))
    assert main(["run", str(path)]) == 1
    st = statuses(tmp_path)
    assert st["gate_sft"] == "blocked" and st["dpo"] == st["gate_dpo"] == st["export"] == "blocked"
    assert not (tmp_path / "wf" / "dpo").exists()
    gate = json.loads((tmp_path / "wf" / "workflow.json").read_text())["gates"][0]
    assert gate["passed"] is False and [c["passed"] for c in gate["checks"]] == [False, False]
    err = capsys.readouterr().err  # the log and the gate table go to stderr, like every run's log
    assert "BLOCKED" in err and "heldout/loss" in err and "FAIL" in err


def test_contaminated_eval_set_blocks_before_training(tiny_dir, tmp_path):
    rows = chat_rows(20)
    dup = write_jsonl(tmp_path / "dup.jsonl", rows + rows)  # every row twice: held-out rows have a copy in train
    path = write_workflow(tmp_path, tiny_dir)
    wf = yaml.safe_load(path.read_text())
    wf["eval_set"]["split"] = dup
    path.write_text(yaml.safe_dump(wf))
    assert main(["run", str(path)]) == 1
    assert statuses(tmp_path)["eval_set"] == "blocked" and not (tmp_path / "wf" / "sft").exists()


def test_workflow_config_errors(tmp_path, tiny_dir, capsys):
    path = write_workflow(tmp_path, tiny_dir)
    wf = yaml.safe_load(path.read_text())
    wf["stages"][2]["init_from"] = "nope"
    path.write_text(yaml.safe_dump(wf))
    assert main(["run", str(path)]) == 2
    assert "refers to 'nope', which is not an earlier train stage" in capsys.readouterr().err


WORKFLOWS = sorted(Path(__file__).resolve().parent.parent.joinpath("examples", "workflows").glob("*.yaml"))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_every_example_workflow_and_its_stage_configs_validate(path):
    check_workflow(path, path.parent.parent.parent)


def test_the_demo_workflow_validates(tmp_path):
    from posttrain.demo import write_demo_files

    for quick in (False, True):
        check_workflow(write_demo_files(tmp_path / str(quick), quick), Path("."))


def check_workflow(path: Path, root: Path) -> None:
    from posttrain.config import load_workflow
    from posttrain.workflow import Workflow

    cfg = load_workflow(path)
    wf = Workflow(cfg)  # checks every suite's options against the suite kinds
    wf.names.update(train_set="train.jsonl", eval_set="eval.jsonl")
    for st in cfg.stages:
        if st.train:
            job = wf.job_of(st)
            assert job.method == st.train and job.output_dir == str(wf.root / st.name)
    for spec in cfg.evals.values():
        data = spec.data.replace("${eval_set}", "")
        assert not data or (root / data).is_file() or Path(data).is_file(), data
    if cfg.eval_set.split:
        assert (root / cfg.eval_set.split).is_file() or Path(cfg.eval_set.split).is_file()


def test_unknown_suite_option_and_empty_rule_are_errors_before_anything_runs(tmp_path, tiny_dir, capsys):
    path = write_workflow(tmp_path, tiny_dir)
    wf = yaml.safe_load(path.read_text())
    wf["evals"]["heldout"]["options"] = {"scorer": "exact"}  # a loss suite has no scorer
    path.write_text(yaml.safe_dump(wf))
    assert main(["run", str(path)]) == 2
    assert "evals.heldout: loss suites have no option scorer" in capsys.readouterr().err
    wf["evals"]["heldout"]["options"] = {}
    wf["stages"][1]["gate"]["rules"] = [{"metric": "heldout/loss"}]
    path.write_text(yaml.safe_dump(wf))
    assert main(["run", str(path)]) == 2
    assert "sets no threshold" in capsys.readouterr().err
    assert not (tmp_path / "wf").exists()


def test_eval_suites_on_a_model_without_a_workflow(tiny_dir, tmp_path, capsys):
    from posttrain.eval.suites import run_suite
    from posttrain.runs import load_for_inference

    data = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "What is 3 and 4?", "answer": "#### 7"},
                                                {"question": "What is 6 times 2?", "answer": "#### 12"}])
    options = {"n": [1, 2], "max_new_tokens": 4}
    suites = tmp_path / "suites.yaml"
    suites.write_text(yaml.safe_dump({"name": "gsm-bon", "system_prompt": "Answer with a number.",
                                      "evals": {"bon": {"kind": "best_of_n", "data": str(data), "options": options}}}))
    out = tmp_path / "out"
    assert main(["eval", tiny_dir, "--suites", str(suites), "--out", str(out)]) == 0
    saved = json.loads((out / "evals.json").read_text())
    loaded = load_for_inference(tiny_dir, None)
    direct = run_suite("best_of_n", loaded.model, loaded.tokenizer, str(data), options=options,
                       system_prompt="Answer with a number.")
    assert saved["suites"]["bon"]["metrics"] == direct.metrics  # the same samples: seeded by (seed, row, j)
    assert "majority@2" in saved["suites"]["bon"]["metrics"]
    html = (out / "report.html").read_text()
    assert "best-of-N" in html or "best of N" in html.lower()
    # the file is checked before any model loads: an unknown option, a judge suite
    suites.write_text(yaml.safe_dump({"evals": {"bon": {"kind": "best_of_n", "data": str(data), "options": {"m": 1}}}}))
    assert main(["eval", tiny_dir, "--suites", str(suites)]) == 2
    assert "no option m" in capsys.readouterr().err
    suites.write_text(yaml.safe_dump({"evals": {"j": {"kind": "judge", "data": str(data)}}}))
    assert main(["eval", tiny_dir, "--suites", str(suites)]) == 2
    assert "run them in a workflow" in capsys.readouterr().err
