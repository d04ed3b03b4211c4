"""train.report_to: each tracker gets metrics.jsonl's records, the config and summary.json's final evals, read back
from its local store with no network (MLflow's file store, W&B offline, Trackio's SQLite); a missing package stops
the run before the model loads; only rank 0 logs; a resumed run's tracker run holds the whole history."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from posttrain.config import load_config
from posttrain.data import collate
from posttrain.engine import trackers
from posttrain.engine.checkpoint import list_checkpoints
from posttrain.engine.loop import train_loop
from posttrain.errors import ConfigError
from posttrain.methods import SFT
from posttrain.recipes import _common
from posttrain.recipes.sft import run as run_sft
from tests.helpers import chat_rows, loop_opts, random_examples, write_jsonl

STEPS = 3


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def by_step(recs: list[dict]) -> dict[int, dict[str, float]]:
    """metrics.jsonl's numbers per step (a step's train and eval records together), as a tracker's history has them."""
    out: dict[int, dict[str, float]] = {}
    for r in recs:
        out.setdefault(r["step"], {}).update(trackers.numbers(r))
    return out


@pytest.fixture(scope="module")
def tracked(tiny_dir, tmp_path_factory):
    """A 3-step SFT run of the tiny model, reporting to MLflow, W&B and Trackio, with every store under tmp."""
    for name in ("mlflow", "wandb", "trackio"):
        if not trackers.installed(name):  # not imported here: trackio must first see TRACKIO_DIR
            pytest.skip(f"{name} is not installed (pip install 'posttrain[trackers]')")
    root = tmp_path_factory.mktemp("trackers")
    job = root / "job.yaml"
    data = write_jsonl(root / "d.jsonl", chat_rows(24))
    job.write_text(f"method: sft\nmodel: {{name: {tiny_dir}}}\ndata: {{train: {data}}}\n")
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("WANDB_DIR", raising=False)
        # trackio reads TRACKIO_DIR once, when first imported: imported earlier, it would write to the home folder.
        assert "trackio" not in sys.modules, "trackio was imported before this fixture set TRACKIO_DIR"
        mp.setenv("TRACKIO_DIR", str(root / "trackio"))
        cfg = load_config(job, [f"output_dir={out}", f"train.max_steps={STEPS}", "train.eval_every=1",
                                "train.micro_batch_size=2", "data.eval_fraction=0.2", "eval_samples=0",
                                "train.report_to=[mlflow,wandb,trackio]", f"train.tracker_project=pt-{root.name}",
                                "train.run_name=tiny-sft"])
        run_sft(cfg)
    return out, cfg


def test_mlflow_file_store_holds_the_records_the_config_and_the_final_evals(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's file store, as the run chose it
    out, cfg = tracked
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name(cfg.train.tracker_project).experiment_id])
    assert run.info.run_name == "tiny-sft" and run.info.status == "FINISHED"
    expected = by_step(records(out))
    for key in {k for values in expected.values() for k in values}:
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert history == [(s, v[key]) for s, v in sorted(expected.items()) if key in v], key
    assert run.data.params["train.lr"] == str(cfg.train.lr) and run.data.params["model.name"] == cfg.model.name
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(out / "dl"))).read_text()
    assert yaml.safe_load(config) == yaml.safe_load((out / "config.yaml").read_text())
    summary = json.loads((out / "summary.json").read_text())
    for when in ("eval_before", "eval_after"):
        for key in ("eval/loss", "eval/ppl"):
            assert run.data.metrics[f"{when}/{key}"] == summary[when][key]
    assert run.data.metrics["final_loss"] == summary["final_loss"]


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline .wandb file: a 7-byte header (':W&B', magic, version), then LevelDB's
    log format: 32 KiB blocks of chunks, each a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
    4 last) and its bytes; a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, out, buf = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_offline_run_holds_the_records_the_config_and_the_final_evals(tracked):
    out, cfg = tracked
    [path] = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    recs = wandb_records(path)
    history = {}
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    assert history == by_step(records(out))
    [run] = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert run.display_name == "tiny-sft" and run.project == cfg.train.tracker_project
    assert config["train"]["lr"] == cfg.train.lr and config["model"]["name"] == cfg.model.name
    final = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            final.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.summary.update})
    summary = json.loads((out / "summary.json").read_text())
    assert final["eval_after/eval/loss"] == summary["eval_after"]["eval/loss"]
    assert final["eval_before/eval/ppl"] == summary["eval_before"]["eval/ppl"]
    assert final["final_loss"] == summary["final_loss"]
    assert [r.exit.exit_code for r in recs if r.WhichOneof("record_type") == "exit"] == [0]


def test_trackio_local_store_holds_the_records_the_config_and_the_final_evals(tracked):
    from trackio.sqlite_storage import SQLiteStorage

    out, cfg = tracked
    project = cfg.train.tracker_project
    logs = SQLiteStorage.get_logs(project, "tiny-sft")
    rows: dict[int, dict] = {}
    for row in logs:
        rows.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k not in ("step", "timestamp")})
    expected = by_step(records(out))
    summary = json.loads((out / "summary.json").read_text())
    # The final evals come last, at the last step, under their own names; the rest of that step is its records.
    final = {k: rows[STEPS].pop(k) for k in list(rows[STEPS]) if k.startswith(("eval_before/", "eval_after/"))
             or k in ("final_loss", "steps")}
    assert final["eval_after/eval/loss"] == summary["eval_after"]["eval/loss"]
    assert final["eval_before/eval/ppl"] == summary["eval_before"]["eval/ppl"]
    assert final["final_loss"] == summary["final_loss"] and final["steps"] == STEPS
    assert rows == expected
    config = SQLiteStorage.get_run_config(project, "tiny-sft")
    assert config["train"]["lr"] == cfg.train.lr and config["output_dir"] == str(out)


# --- the wiring, with a tracker that records its calls ------------------------------------------------------------

class Recording:
    """A tracker that keeps what it is given (the ``json`` module stands in for its package)."""
    package, module = "json-package", "json"
    seen: list["Recording"] = []

    def __init__(self, project: str, name: str):
        self.project, self.name, self.logged, self.final, self.config = project, name, [], None, None
        Recording.seen.append(self)

    def start(self, config, run_dir):
        self.config, self.run_dir = config, run_dir

    def log(self, record, step):
        self.logged.append((step, record))

    def finish(self, final, failed):
        self.final, self.failed = final, failed


@pytest.fixture
def recording(monkeypatch):
    Recording.seen = []
    monkeypatch.setitem(trackers.TRACKERS, "mlflow", Recording)
    return Recording


class Fixed:
    def step(self, step):
        return [collate([[e] for e in random_examples(2, 49152, seed=step)], 0)]


def tiny(tiny_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


def test_only_rank_0_logs(tiny_dir, tmp_path, monkeypatch, recording):
    monkeypatch.setenv("RANK", "1")  # a second process's view, in a world of one (no process group to join)
    train_loop(tiny(tiny_dir), SFT(), Fixed(), loop_opts(2, report_to=["mlflow"]), tmp_path / "r1")
    assert recording.seen == [] and not (tmp_path / "r1" / "metrics.jsonl").exists()
    monkeypatch.setenv("RANK", "0")
    train_loop(tiny(tiny_dir), SFT(), Fixed(), loop_opts(2, report_to=["mlflow"]), tmp_path / "r0")
    [t] = recording.seen
    assert [s for s, _ in t.logged] == [1, 2] and t.failed is False and t.name == "r0"


def test_a_resumed_run_sends_the_whole_history_again(tiny_dir, tmp_path, recording):
    train_loop(tiny(tiny_dir), SFT(), Fixed(), loop_opts(4, save_every=2, report_to=["mlflow"]), tmp_path)
    shutil.rmtree(list_checkpoints(tmp_path / "checkpoints")[-1])  # as if it died after step 3
    train_loop(tiny(tiny_dir), SFT(), Fixed(), loop_opts(4, report_to=["mlflow"]), tmp_path, resume=True)
    first, resumed = recording.seen
    expected = [(r["step"], trackers.numbers(r)) for r in records(tmp_path) if trackers.numbers(r)]
    assert resumed.logged == expected and [s for s, _ in expected] == [1, 2, 3, 4]
    assert resumed.final["final_loss"] == expected[-1][1]["loss"] and resumed.final["steps"] == 4


def test_a_failed_run_ends_its_tracker_runs_as_failed(tiny_dir, tmp_path, recording):
    class Broken(Fixed):
        def step(self, step):
            if step == 1:
                raise RuntimeError("data went away")
            return super().step(step)

    with pytest.raises(RuntimeError, match="data went away"):
        train_loop(tiny(tiny_dir), SFT(), Broken(), loop_opts(3, report_to=["mlflow"]), tmp_path)
    [t] = recording.seen
    assert t.failed is True and [s for s, _ in t.logged] == [1]


def test_a_tracker_failing_mid_run_is_dropped_and_the_run_goes_on(tiny_dir, tmp_path, recording, capsys):
    class Flaky(Recording):
        def log(self, record, step):
            if step == 2:
                raise ConnectionError("server gone")
            super().log(record, step)

    trackers.TRACKERS["mlflow"] = Flaky
    recs = train_loop(tiny(tiny_dir), SFT(), Fixed(), loop_opts(3, report_to=["mlflow"]), tmp_path)
    [t] = recording.seen
    assert [s for s, _ in t.logged] == [1] and t.final is None and len(recs) == 3
    assert "Flaky dropped: ConnectionError: server gone" in capsys.readouterr().err


def test_tensorboard_gets_every_scalar(tiny_dir, tmp_path, monkeypatch):
    scalars = []

    class Writer:
        def __init__(self, logdir, purge_step=None):
            self.logdir, self.purge_step = logdir, purge_step

        def add_scalar(self, key, value, step):
            scalars.append((step, key, value))

        def add_text(self, *a):
            pass

        def close(self):
            pass

    # The tensorboard package is optional (not in the lock); torch's writer is replaced by one that keeps the calls.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.setattr(trackers, "installed", lambda module: True)
    train_loop(tiny(tiny_dir), SFT(), Fixed(), loop_opts(2, report_to=["tensorboard"]), tmp_path)
    assert scalars == [(r["step"], k, v) for r in records(tmp_path) for k, v in trackers.numbers(r).items()]


def test_tensorboard_event_files_hold_the_records_and_a_rerun_replaces_them(tiny_dir, tmp_path):
    pytest.importorskip("tensorboard")  # in the trackers extra, not in the lock
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for total in (3, 2):  # the second run into the same folder hides the first one's steps, as metrics.jsonl does
        train_loop(tiny(tiny_dir), SFT(), Fixed(), loop_opts(total, report_to=["tensorboard"]), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    expected = by_step(records(tmp_path))
    for key in events.Tags()["scalars"]:
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(s, pytest.approx(v[key], rel=1e-6)) for s, v in sorted(expected.items()) if key in v]
    assert set(events.Tags()["scalars"]) == {k for v in expected.values() for k in v}


# --- start-up -------------------------------------------------------------------------------------------------------

def test_a_missing_package_stops_the_run_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    real = trackers.installed
    monkeypatch.setattr(trackers, "installed", lambda module: module != "wandb" and real(module))
    monkeypatch.setattr(_common, "load_base", lambda *a: pytest.fail("the model was loaded"))
    job = tmp_path / "job.yaml"
    job.write_text(f"method: sft\nmodel: {{name: {tiny_dir}}}\ndata: {{train: d.jsonl}}\n")
    cfg = load_config(job, [f"output_dir={tmp_path / 'run'}", "train.report_to=[mlflow,wandb]"])
    with pytest.raises(ConfigError, match=r"train.report_to needs wandb \(pip install wandb\)"):
        _common.begin_run(cfg)


def test_a_workflow_stops_before_its_baseline_loads_a_model(tiny_dir, tmp_path, monkeypatch):
    from posttrain.config import load_workflow
    from posttrain.workflow import Workflow

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(10))
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump({
        "name": "t", "output_dir": str(tmp_path / "wf"), "model": tiny_dir, "eval_set": {"split": data},
        "evals": {"heldout": {"kind": "loss", "data": "${eval_set}"}},
        "stages": [{"name": "sft", "train": "sft", "config": {"data": {"train": "${train_set}"},
                                                             "train": {"report_to": ["trackio"]}}}]}))
    monkeypatch.setattr(trackers, "installed", lambda module: module != "trackio")
    monkeypatch.setattr(Workflow, "baseline", lambda self: pytest.fail("the baseline was evaluated"))
    with pytest.raises(ConfigError, match=r"needs trackio \(pip install trackio\)"):
        Workflow(load_workflow(str(tmp_path / "wf.yaml"))).run()


def test_report_to_values(tmp_path, monkeypatch):
    job = tmp_path / "job.yaml"
    job.write_text("method: sft\noutput_dir: x\ndata: {train: d.jsonl}\n")
    assert load_config(job).train.report_to == "auto"
    assert load_config(job, ["train.report_to=wandb"]).train.report_to == ["wandb"]  # one name, as a list of one
    assert load_config(job, ["train.report_to=[]"]).train.report_to == []
    with pytest.raises(ConfigError, match="report_to"):
        load_config(job, ["train.report_to=[neptune]"])
    # As before the key: TensorBoard only when torch's writer imports (it refuses a missing or too old tensorboard).
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # None in sys.modules: the import fails
    assert trackers.resolve("auto") == []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace())
    assert trackers.resolve("auto") == ["tensorboard"] and trackers.resolve(["wandb", "wandb"]) == ["wandb"]
