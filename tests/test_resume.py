"""--resume is a promise: a resumed run is the run that was started, continued, or it is refused before anything.

One 4-step SFT run (checkpoints at 2 and 4) is made once; each test resumes a copy of it from step 2 after the
step-4 checkpoint is deleted, as after a crash.
"""

import hashlib
import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import posttrain.recipes._common
from posttrain.cli import main
from posttrain.config import dump_config, load_config
from posttrain.engine.checkpoint import list_checkpoints, trainer_state
from posttrain.engine.schedule import Schedule, warmup_cosine
from posttrain.errors import ConfigError
from posttrain.recipes import RECIPES
from posttrain.recipes._resume import BOOKKEEPING, check_resume, input_hashes
from posttrain.recipes.sft import run as run_sft
from tests.helpers import chat_rows, loop_opts, pair_rows, write_jsonl

LR, MIN = 5e-3, 0.1
BASE = ["train.max_steps=4", "train.save_every=2", "train.micro_batch_size=2", f"train.lr={LR}",
        "train.warmup_ratio=0", f"train.min_lr_ratio={MIN}", "data.eval_fraction=0.1", "data.packing=false",
        "eval_samples=0", "lora.dropout=0.1"]


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def steps(out: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records(out) if key in r}


@pytest.fixture(scope="module")
def interrupted(tiny_dir, tmp_path_factory):
    """(run folder resumable from step 2, job.yaml, data file, the uninterrupted run's {step: loss} and {step: lr})."""
    root = tmp_path_factory.mktemp("resume")
    data = write_jsonl(root / "train.jsonl", chat_rows(40))
    job = root / "job.yaml"
    job.write_text(f"method: sft\nmodel: {{name: {tiny_dir}}}\ndata: {{train: {data}}}\n")
    out = root / "run"
    run_sft(load_config(job, [*BASE, f"output_dir={out}"]))
    loss, lr = steps(out, "loss"), steps(out, "lr")
    ckpts = list_checkpoints(out / "checkpoints")
    assert [c.name for c in ckpts] == ["step-0000002", "step-0000004"]
    shutil.rmtree(ckpts[-1])
    return out, job, data, loss, lr


@pytest.fixture
def run(interrupted, tmp_path):
    """A copy of the interrupted run; its output_dir moved with it (a bookkeeping change)."""
    dest = tmp_path / "run"
    shutil.copytree(interrupted[0], dest)
    return dest


def resume_cli(interrupted, run: Path, *extra: str) -> int:
    return main(["sft", str(interrupted[1]), *BASE, f"output_dir={run}", *extra, "--resume"])


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_load(monkeypatch):
    """A resume that gets as far as loading the model fails the test: refusals come before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the resume check")
    monkeypatch.setattr(posttrain.recipes._common, "load_base", refuse)


# --- the schedule's arithmetic -------------------------------------------------------------------------------------

def test_schedule_is_warmup_cosine():
    s = Schedule(total_steps=11, warmup_steps=2, min_ratio=0.1)
    assert [s(i) for i in range(11)] == [warmup_cosine(i, total_steps=11, warmup_steps=2, min_ratio=0.1)
                                         for i in range(11)]


def test_relaid_schedule_hand_values():
    old = Schedule(total_steps=4, warmup_steps=0, min_ratio=0.1)
    # 0.1 + 0.9 * 0.5 * (1 + cos(pi * k / 3)): 1.0, 0.775, 0.325, 0.1
    assert [old(k) for k in range(4)] == pytest.approx([1.0, 0.775, 0.325, 0.1])
    new = old.relaid(at=2, total_steps=8)
    seq = [new(k) for k in range(2, 8)]
    # from 0.325 at the resume step down to the floor at the new last step: 0.1 + 0.225 * 0.5 * (1 + cos(pi * j / 5))
    assert seq == pytest.approx([0.1 + 0.225 * 0.5 * (1 + math.cos(math.pi * j / 5)) for j in range(6)])
    assert seq[0] == pytest.approx(old(2)) and seq[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in itertools.pairwise(seq))
    # What the loop used to do: a fresh cosine over 8 steps puts step 2 at 0.83, above the 0.775 of step 1.
    assert warmup_cosine(2, total_steps=8, warmup_steps=0, min_ratio=0.1) > old(1)
    shorter = old.relaid(at=2, total_steps=3)  # one step left: it runs at the current lr
    assert shorter(2) == pytest.approx(0.325)
    again = new.relaid(at=5, total_steps=10)  # a re-laid schedule re-lays from its own current value
    assert again(5) == pytest.approx(new(5)) and again(9) == pytest.approx(0.1)


def test_relaid_inside_warmup_finishes_the_warmup():
    old = Schedule(total_steps=10, warmup_steps=4, min_ratio=0.0)
    new = old.relaid(at=2, total_steps=21)
    assert [new(k) for k in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # as planned
    assert new(4) == pytest.approx(1.0) and new(20) == pytest.approx(0.0)
    assert new(12) == pytest.approx(0.5)  # halfway through the decay over steps 4..20


# --- refusals --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,expected", [
    ("train.lr=1e-3", f"train.lr: {LR} -> 0.001"),
    ("lora.r=8", "lora.r: 16 -> 8"),
    ("train.max_steps=8", "train.max_steps: 4 -> 8"),
    ("train.seed=1", "train.seed: 0 -> 1"),
    ("kl_to_base=0.1", "kl_to_base: 0.0 -> 0.1"),  # SFT's method parameter
    ("train.grad_accum=2", "train.grad_accum: 1 -> 2"),
    ("model.dtype=float32", 'model.dtype: "auto" -> "float32"'),
])
def test_result_changing_key_is_refused_before_anything(interrupted, run, override, expected, capsys, no_model_load):
    before = snapshot(run)
    assert resume_cli(interrupted, run, override) == 2
    err = capsys.readouterr().err
    assert "--resume refused" in err and expected in err and "Traceback" not in err, err
    assert "  output_dir:" not in err  # the moved folder is an allowed change, not a refused one
    assert snapshot(run) == before  # not even config.yaml or metrics.jsonl was touched
    if override.startswith("train.max_steps"):
        assert "--extend-steps" in err


def test_other_data_file_is_refused(interrupted, run, tmp_path, capsys, no_model_load):
    other = write_jsonl(tmp_path / "other.jsonl", chat_rows(40, seed=1))
    before = snapshot(run)
    assert resume_cli(interrupted, run, f"data.train={other}") == 2
    err = capsys.readouterr().err
    assert f'data.train: "{interrupted[2]}" -> "{other}"' in err
    assert snapshot(run) == before and "other.jsonl" not in (run / "config.yaml").read_text()


def test_edited_data_file_under_the_same_name_is_refused(interrupted, run, capsys, no_model_load):
    data = Path(interrupted[2])
    original = data.read_bytes()
    try:
        write_jsonl(data, chat_rows(40, seed=2))
        assert resume_cli(interrupted, run) == 2
    finally:
        data.write_bytes(original)
    err = capsys.readouterr().err
    old = trainer_state(list_checkpoints(run / "checkpoints")[-1])["inputs"]["data.train"]
    assert f"data.train (file content): sha256 {old[:12]} -> sha256 " in err


def test_several_differences_are_all_listed(interrupted, run, capsys, no_model_load):
    assert resume_cli(interrupted, run, "train.lr=1e-3", "lora.alpha=8", "train.log_every=2") == 2
    err = capsys.readouterr().err
    assert "2 key(s) differ" in err and "train.lr:" in err and "lora.alpha: 32.0 -> 8.0" in err
    assert "train.log_every: 1" not in err  # allowed, so not among the refused


def test_checkpoint_without_its_own_config_falls_back_to_the_run_config(interrupted, run, capsys, no_model_load):
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    (ckpt / "config.yaml").unlink()  # as written before checkpoints carried their config
    assert resume_cli(interrupted, run, "train.lr=1e-3") == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.005 -> 0.001" in err and str(run / "config.yaml") in err


def test_nothing_to_compare_with_is_refused(interrupted, run, capsys, no_model_load):
    (list_checkpoints(run / "checkpoints")[-1] / "config.yaml").unlink()
    (run / "config.yaml").unlink()
    assert resume_cli(interrupted, run) == 2
    assert "nothing to check the new config against" in capsys.readouterr().err


def test_extend_steps_limits(interrupted, run, capsys, no_model_load):
    assert resume_cli(interrupted, run, "train.max_steps=2", "--extend-steps") == 2
    assert "leaves no step to train" in capsys.readouterr().err
    assert main(["sft", str(interrupted[1]), *BASE, f"output_dir={run}", "--extend-steps"]) == 2
    assert "goes with --resume" in capsys.readouterr().err
    state_file = list_checkpoints(run / "checkpoints")[-1] / "trainer_state.json"
    legacy = {k: v for k, v in json.loads(state_file.read_text()).items() if k not in ("schedule", "inputs")}
    state_file.write_text(json.dumps(legacy))  # a checkpoint from before schedules were recorded
    assert resume_cli(interrupted, run, "train.max_steps=8", "--extend-steps") == 2
    assert "cannot be re-laid honestly" in capsys.readouterr().err


# dpo, kto, reward, grpo and ppo resume through the same check: a checkpoint of each (as train_loop writes it) and a
# changed method parameter, refused before the model is loaded.
def _method_cfg(method: str, tmp_path: Path, tiny_dir: str, *extra: str):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"Say {i}."} for i in range(8)])
    base = {"rewards": [{"name": "regex", "options": {"pattern": "1"}}]} if method == "grpo" else {}
    unpaired = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": f"Say {i}.", "completion": f"{i}.", "label": i % 2 == 0}
                                                    for i in range(8)])
    over = {"dpo": [f"data.train={pairs}"], "reward": [f"data.train={pairs}"], "grpo": [f"data.train={prompts}"],
            "kto": [f"data.train={unpaired}"],
            "ppo": [f"data.train={prompts}", f"ppo.reward_model={tmp_path / 'rm'}"]}[method]
    return load_config(None, [f"model.name={tiny_dir}", f"output_dir={tmp_path / 'out'}", *over, *extra],
                       method=method, base=base)


@pytest.mark.parametrize("method,override,expected", [
    ("dpo", "dpo.beta=0.5", "dpo.beta: 0.1 -> 0.5"),
    ("kto", "kto.beta=0.5", "kto.beta: 0.1 -> 0.5"),
    ("reward", "reward.margin=1.0", "reward.margin: 0.0 -> 1.0"),
    ("grpo", "grpo.kl_coef=0.0", "grpo.kl_coef: 0.04 -> 0.0"),
    ("ppo", "ppo.vf_coef=0.5", "ppo.vf_coef: 0.1 -> 0.5"),
])
def test_every_method_resumes_through_the_check(method, override, expected, tmp_path, tiny_dir, no_model_load):
    old = _method_cfg(method, tmp_path, tiny_dir)
    ckpt = tmp_path / "out" / "checkpoints" / "step-0000002"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(dump_config(old))
    sched = {"total_steps": 4, "warmup_steps": 0, "min_ratio": 0.1, "decay_from": None, "decay_start": 1.0}
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "total_steps": 4, "schedule": sched,
                                                         "inputs": input_hashes(old)}))
    (ckpt / "COMPLETE").write_text("ok\n")
    assert check_resume(old, True).checkpoint == ckpt  # unchanged: passes
    run = RECIPES[method].run
    with pytest.raises(ConfigError, match="--resume refused") as exc:
        run(_method_cfg(method, tmp_path, tiny_dir, override), resume=True)
    assert expected in str(exc.value)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoints"]


def test_another_number_of_processes_needs_the_same_global_batch(interrupted, run, monkeypatch):
    same = load_config(interrupted[1], [*BASE, f"output_dir={run}"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: twice the rows per step with the same grad_accum
    with pytest.raises(ConfigError) as exc:
        check_resume(same, True)
    assert "global batch (micro_batch_size x grad_accum x processes): 2 x 1 x 1 = 2 -> 2 x 1 x 2 = 4" in str(exc.value)
    monkeypatch.delenv("WORLD_SIZE")
    state_file = list_checkpoints(run / "checkpoints")[-1] / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))  # as if it had run on 2 processes
    job = load_config(interrupted[1], [*BASE, f"output_dir={run}", "train.grad_accum=2"])
    start = check_resume(job, True)  # 2 x 2 x 1 = 2 x 1 x 2: the same steps, split differently
    assert start.changes["train.grad_accum"] == (1, 2) and start.changes["processes"] == (2, 1)
    with pytest.raises(ConfigError, match="train.grad_accum: 1 -> 4"):
        check_resume(load_config(interrupted[1], [*BASE, f"output_dir={run}", "train.grad_accum=4"]), True)


def test_the_table_is_bookkeeping_only():
    # A reviewed list: adding a key here is a claim that it cannot change what a run computes.
    # train.max_minutes: a wall-clock budget only decides after which step a run stops (no step's computation reads
    # it), and a budget is not reproducible anyway; a stopped run resumes towards train.max_steps.
    # train.report_to, tracker_project, run_name: where the records are sent, never what a step computes.
    assert set(BOOKKEEPING) == {"output_dir", "train.log_every", "train.eval_every", "train.save_every",
                                "train.save_total_limit", "eval_samples", "train.max_minutes", "train.report_to",
                                "train.tracker_project", "train.run_name"}


# --- allowed changes -------------------------------------------------------------------------------------------------

def test_bookkeeping_changes_are_applied_and_recorded(interrupted, run):
    assert resume_cli(interrupted, run, "train.log_every=2", "train.save_every=1", "train.eval_every=1") == 0
    recs = records(run)
    resumed = [r for r in recs if "resumed" in r]
    assert len(resumed) == 1 and resumed[0]["step"] == 2
    changes = resumed[0]["resumed"]["changes"]
    assert resumed[0]["resumed"]["from"] == "step-0000002" and "lr_schedule" not in resumed[0]["resumed"]
    assert changes["train.log_every"] == [1, 2] and changes["train.save_every"] == [2, 1]
    assert changes["train.eval_every"] == [None, 1] and changes["output_dir"] == [str(interrupted[0]), str(run)]
    # Bookkeeping indeed: the resumed step 4 is the uninterrupted run's step 4 (dropout on, so the RNG is used too).
    loss = steps(run, "loss")
    assert sorted(loss) == [1, 2, 4] and loss[4] == pytest.approx(interrupted[3][4], abs=1e-6)
    assert 3 in steps(run, "eval/loss")  # evaluated at step 3: the new eval_every applied
    text = (run / "config.yaml").read_text()
    assert "log_every: 2" in text and "save_every: 1" in text
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    assert ckpt.name == "step-0000004" and (ckpt / "config.yaml").read_text() == text
    assert trainer_state(ckpt)["inputs"]["data.train"] == hashlib.sha256(Path(interrupted[2]).read_bytes()).hexdigest()


def test_extend_steps_relays_the_rest_of_the_decay(interrupted, run):
    assert resume_cli(interrupted, run, "train.max_steps=8", "--extend-steps") == 0
    old, lr = interrupted[4], steps(run, "lr")
    assert sorted(lr) == list(range(1, 9))
    assert lr[1] == old[1] and lr[2] == old[2]  # the steps taken keep their lr
    assert lr[3] == pytest.approx(old[3])  # continuous: the first resumed step runs at the lr it had before
    after = [lr[s] for s in range(3, 9)]
    assert all(a > b for a, b in itertools.pairwise(after)) and lr[8] == pytest.approx(MIN * LR)
    expected = [LR * (MIN + (0.325 - MIN) * 0.5 * (1 + math.cos(math.pi * j / 5))) for j in range(6)]
    assert after == pytest.approx(expected)
    entry = next(r for r in records(run) if "resumed" in r)["resumed"]
    assert entry["changes"]["train.max_steps"] == [4, 8] and entry["lr_schedule"]["decay_from"] == 2
    assert "max_steps: 8" in (run / "config.yaml").read_text()

    # Resumed again (same length, no option): the re-laid schedule goes on, it is not drawn afresh over 8 steps.
    ckpts = list_checkpoints(run / "checkpoints")
    assert [c.name for c in ckpts] == ["step-0000006", "step-0000008"]
    shutil.rmtree(ckpts[-1])
    assert resume_cli(interrupted, run, "train.max_steps=8") == 0
    again = steps(run, "lr")
    assert [again[s] for s in range(1, 9)] == pytest.approx([lr[s] for s in range(1, 9)])


def test_lowering_max_steps_with_the_option(interrupted, run, capsys):
    assert resume_cli(interrupted, run, "train.max_steps=3") == 2  # without it: refused
    assert "train.max_steps: 4 -> 3" in capsys.readouterr().err
    assert resume_cli(interrupted, run, "train.max_steps=3", "--extend-steps") == 0
    lr = steps(run, "lr")
    assert sorted(lr) == [1, 2, 3] and lr[3] == pytest.approx(interrupted[4][3])  # the one step left: current lr
    assert steps(run, "loss")[3] == pytest.approx(interrupted[3][3], abs=1e-6)


def test_checkpoint_from_before_this_version_resumes(interrupted, run):
    """No config.yaml, schedule or input hashes in the checkpoint: checked against the run's config.yaml."""
    ckpt = list_checkpoints(run / "checkpoints")[-1]
    (ckpt / "config.yaml").unlink()
    state_file = ckpt / "trainer_state.json"
    state_file.write_text(json.dumps({k: v for k, v in json.loads(state_file.read_text()).items()
                                      if k not in ("schedule", "inputs")}))
    assert resume_cli(interrupted, run) == 0
    assert steps(run, "loss")[4] == pytest.approx(interrupted[3][4], abs=1e-6)


def test_unchecked_engine_resume_refuses_another_length(tiny_dir, tmp_path):
    """train_loop(resume=True) without a recipe's check still never re-lays a schedule silently."""
    from transformers import AutoModelForCausalLM

    from posttrain.data import collate
    from posttrain.engine.loop import train_loop
    from posttrain.methods import SFT
    from tests.helpers import random_examples

    class Fixed:
        def step(self, step):
            return [collate([[e] for e in random_examples(2, 49152, seed=step)], 0)]

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    train_loop(model, SFT(), Fixed(), loop_opts(2, lr=1e-3, save_every=1), tmp_path)
    shutil.rmtree(list_checkpoints(tmp_path / "checkpoints")[-1])
    with pytest.raises(ConfigError, match="--extend-steps"):
        train_loop(model, SFT(), Fixed(), loop_opts(4, lr=1e-3), tmp_path, resume=True)
    train_loop(model, SFT(), Fixed(), loop_opts(2, lr=1e-3), tmp_path, resume=True)  # same length: fine
    assert steps(tmp_path, "loss").keys() == {1, 2}


def test_auto_resolving_to_other_numerics_on_this_machine_is_refused(interrupted, run, capsys, no_model_load,
                                                                      monkeypatch):
    """Same config, but model.dtype=auto now picks bf16_mixed (a CPU with native bf16) where the run was fp32."""
    from posttrain.models import numerics

    monkeypatch.setenv(numerics.FLAGS_ENV, "avx512_bf16")
    monkeypatch.setattr(numerics, "bf16_probe_speedup", lambda: 2.5)
    before = snapshot(run)
    assert resume_cli(interrupted, run) == 2
    err = capsys.readouterr().err
    assert 'numerics (model.dtype auto on this machine): float32 -> bf16_mixed' in err
    assert snapshot(run) == before
