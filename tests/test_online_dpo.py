"""Online DPO: picking best vs worst (scores, a judge in both orders), rounds written with provenance and trained on
as sampled, the judge and reward scorers end to end, config checks, and resume-equals-uninterrupted."""

import json
import math
import shutil

import pytest
import torch

from posttrain.config import load_config
from posttrain.engine.checkpoint import list_checkpoints
from posttrain.errors import ConfigError
from posttrain.methods.online_dpo import pick_by_judge, pick_by_scores
from posttrain.recipes.online_dpo import run as run_online
from tests.helpers import step_records, write_jsonl


def letters_e(prompts, completions, **_):
    """A reward with many distinct values on a random model's text: the count of the letter e."""
    return [float(c.count("e")) for c in completions]


def online_cfg(tiny_dir, tmp_path, out, *extra, judge=False):
    rows = [{"prompt": f"Write a word with the letter e, number {i}."} for i in range(10)]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    base = {"online": {"judge": {"criterion": "Which answer has more letters e?"}}} if judge else \
        {"rewards": [{"name": "tests.test_online_dpo:letters_e"}],
         "watch": [{"name": "regex", "options": {"pattern": "[0-9]"}}]}
    return load_config(None, [f"model.name={tiny_dir}", f"data.train={path}", f"output_dir={out}",
                              "data.eval_fraction=0.2", "online.rounds=2", "online.steps_per_round=2",
                              "online.prompts_per_round=3", "online.samples=3", "online.max_new_tokens=8",
                              "train.lr=1e-3", "train.micro_batch_size=2", "train.min_lr_ratio=1.0",
                              "train.warmup_ratio=0.0", *extra], method="online-dpo", base=base)


def test_pick_by_scores_is_best_against_worst_and_drops_ties():
    assert pick_by_scores([0.1, 0.9, 0.5]).__dict__ == {"chosen": 1, "rejected": 0, "scores": [0.1, 0.9, 0.5],
                                                         "outcome": "kept"}
    assert pick_by_scores([2.0, 0.0, 2.0, 0.0]) == pick_by_scores([2.0, 0.0, 2.0, 0.0])
    assert (pick_by_scores([2.0, 0.0, 2.0, 0.0]).chosen, pick_by_scores([2.0, 0.0, 2.0, 0.0]).rejected) == (0, 1)
    tie = pick_by_scores([1.0, 1.0, 1.0])
    assert (tie.outcome, tie.chosen, tie.rejected) == ("tie", None, None)


def table_judge(beats):
    """A judge that reads a fixed table: P(first better) is 0.9 when first beats second, 0.1 when second beats
    first, 0.5 when neither (a tie)."""
    def judge(prompt, first, second, criterion):
        return 0.9 if (first, second) in beats else 0.1 if (second, first) in beats else 0.5
    return judge


def test_pick_by_judge_round_robin_wins_and_every_drop_reason():
    # 3 answers: a beats b and c, c beats b: wins a 2, c 1, b 0 -> a vs b, kept; scores are wins / (k - 1)
    p = pick_by_judge(table_judge({("a", "b"), ("a", "c"), ("c", "b")}), "q", ["a", "b", "c"], "x")
    assert (p.chosen, p.rejected, p.outcome, p.scores) == (0, 1, "kept", [1.0, 0.0, 0.5])
    # a cycle a > b > c > a: every answer wins once, a tie
    p = pick_by_judge(table_judge({("a", "b"), ("b", "c"), ("c", "a")}), "q", ["a", "b", "c"], "x")
    assert (p.outcome, p.chosen, p.scores) == ("tie", None, [0.5, 0.5, 0.5])
    # a pure slot preference (first slot always wins) flips with the order: every verdict inconsistent
    p = pick_by_judge(lambda *_: 0.8, "q", ["a", "b", "c"], "x")
    assert (p.outcome, p.scores) == ("inconsistent", [0.0, 0.0, 0.0])
    # 4 answers: 0 beats 1 and 2 but loses to 3; 1 ties 2; 1 and 2 beat 3. Wins 2, 1.5, 1.5, 1: the most wins (0)
    # against the fewest (3), whom the judge prefers directly: intransitive, dropped
    beats = {("0", "1"), ("0", "2"), ("3", "0"), ("1", "3"), ("2", "3")}
    p = pick_by_judge(table_judge(beats), "q", ["0", "1", "2", "3"], "x")
    assert (p.outcome, p.scores) == ("intransitive", [2 / 3, 0.5, 0.5, 1 / 3])
    # the same with the margin above the judge's 0.4 lead: every verdict a tie
    p = pick_by_judge(table_judge(beats), "q", ["0", "1", "2", "3"], "x", margin=0.45)
    assert p.outcome == "tie"


def test_online_dpo_rounds_with_provenance_trained_as_sampled(tiny_dir, tokenizer, tmp_path):
    out = tmp_path / "run"
    summary = run_online(online_cfg(tiny_dir, tmp_path, out))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert metrics[0]["step"] == 0 and "eval/reward" in metrics[0] and "eval/watch" in metrics[0]
    for r in range(2):
        recs = [json.loads(x) for x in (out / "rounds" / f"round-{r:03d}.jsonl").read_text().splitlines()]
        assert len(recs) == 3 and all(x["round"] == r and x["step"] == 2 * r for x in recs)
        for x in recs:
            assert x["scores"] == [s.count("e") for s in x["samples"]] and len(x["samples"]) == 3
            assert x["outcome"] in ("kept", "tie")
            if x["outcome"] == "kept":
                assert x["scores"][x["chosen"]] == max(x["scores"]) > x["scores"][x["rejected"]] == min(x["scores"])
                # the pair's tokens are the sampled ones: they decode to the sampled text
                for side in ("chosen", "rejected"):
                    text = tokenizer.decode(x[f"{side}_ids"], skip_special_tokens=True)
                    assert text.strip() == x["samples"][x[side]]  # the rollout keeps its texts stripped
                assert len(x["ref_logps"]) == 2 and all(v < 0 for v in x["ref_logps"])
        row = summary["rounds"][r]
        kept = sum(x["outcome"] == "kept" for x in recs)
        assert (row["kept"], row["tie"], row["prompts"]) == (kept, 3 - kept, 3)
        step = steps[2 * r]
        assert step["online/kept"] == kept and step["online/round"] == r
    if summary["rounds"][0]["kept"]:
        # step 1: the reference is the policy itself (LoRA's B is zero), so DPO's loss is exactly ln 2
        assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert steps[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    html = (out / "report.html").read_text()
    assert "rounds: pairs kept and dropped" in html and "online DPO rounds" in html
    assert (out / "rewards.svg").read_text().count("<polyline") >= 3
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_online_dpo_resume_equals_uninterrupted(tiny_dir, tmp_path):
    out = tmp_path / "run"
    extra = ("train.save_every=1", "train.save_total_limit=10")
    run_online(online_cfg(tiny_dir, tmp_path, out, *extra))
    full = step_records(out, ("step", "loss", "grad_norm", "online/sample_score"))
    pairs = (out / "rounds" / "round-001.jsonl").read_text()
    for keep, drop_round in ((3, False), (2, True)):
        # resume mid-round 1 (its pairs read back from round-001.jsonl), then at the round's start with its file
        # gone (sampled again from the restored policy: the same pairs)
        for ck in list_checkpoints(out / "checkpoints"):
            if int(ck.name.split("-")[1]) > keep:
                shutil.rmtree(ck)
        if drop_round:
            (out / "rounds" / "round-001.jsonl").unlink()
        run_online(online_cfg(tiny_dir, tmp_path, out, *extra), resume=True)
        again = step_records(out, ("step", "loss", "grad_norm", "online/sample_score"))
        assert [s for s, *_ in again] == [s for s, *_ in full]
        for (_, la, ga, sa), (_, lb, gb, sb) in zip(full, again):
            assert la == pytest.approx(lb, abs=1e-5) and ga == pytest.approx(gb, rel=1e-4) and sa == sb
        assert (out / "rounds" / "round-001.jsonl").read_text() == pairs


def test_online_dpo_with_the_policy_as_judge(tiny_dir, tmp_path, monkeypatch):
    import posttrain.methods.online_dpo
    import posttrain.recipes.online_dpo

    greedy, amp = posttrain.methods.online_dpo.greedy_texts, []

    def recording(*a, **k):  # the start's answers and every eval's: generated under the same (loop's) autocast
        amp.append(torch.is_autocast_enabled("cpu"))
        return greedy(*a, **k)
    monkeypatch.setattr(posttrain.methods.online_dpo, "greedy_texts", recording)
    monkeypatch.setattr(posttrain.recipes.online_dpo, "greedy_texts", recording)
    out = tmp_path / "judged"
    summary = run_online(online_cfg(tiny_dir, tmp_path, out, "online.rounds=1", "online.samples=2",
                                    "model.dtype=bf16_mixed", judge=True))
    assert len(amp) >= 3 and all(amp)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # step 0: the starting policy against its own greedy answers, every verdict a tie under the calibrated judge
    assert metrics[0]["eval/win_rate"] == 0.5 and metrics[0]["eval/ties"] == 1.0
    recs = [json.loads(x) for x in (out / "rounds" / "round-000.jsonl").read_text().splitlines()]
    assert all(x["scorer"].startswith("calibrated judge") for x in recs)
    assert all(x["outcome"] in ("kept", "tie", "inconsistent") for x in recs)
    for x in recs:  # with two samples a score is 1 for the winner, 0 for the loser, 1/2 each on a tie
        assert sorted(x["scores"]) == ([0.0, 1.0] if x["outcome"] == "kept" else
                                       [0.5, 0.5] if x["outcome"] == "tie" else [0.0, 0.0])
    assert sum(summary["rounds"][0][o] for o in ("kept", "tie", "inconsistent", "intransitive")) == 3
    assert json.loads((out / "rounds" / "eval-baseline.json").read_text())["answers"]


def test_online_dpo_config_checks(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="exactly one scorer"):
        load_config(None, [f"model.name={tiny_dir}", "data.train=x.jsonl"], method="online-dpo")
    with pytest.raises(ConfigError, match="both are set"):
        online_cfg(tiny_dir, tmp_path, tmp_path / "x", "online.judge.criterion=c")
    with pytest.raises(ConfigError, match="online.rounds x online.steps_per_round"):
        online_cfg(tiny_dir, tmp_path, tmp_path / "x", "train.max_steps=3")
    with pytest.raises(ConfigError, match="async_ahead"):
        online_cfg(tiny_dir, tmp_path, tmp_path / "x", "rollout.async_ahead=true")


def test_online_dpo_is_a_workflow_stage_after_sft_with_a_gate(tiny_dir, tmp_path):
    import yaml

    from posttrain.cli import main
    from tests.helpers import chat_rows

    data = write_jsonl(tmp_path / "chats.jsonl", chat_rows(20))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say a word, {i}."} for i in range(8)])
    wf = {"name": "online", "output_dir": str(tmp_path / "wf"), "model": tiny_dir,
          "eval_set": {"split": data, "fraction": 0.2},
          "evals": {"heldout": {"kind": "loss", "data": "${eval_set}"}},
          "stages": [
              {"name": "sft", "train": "sft", "config": {
                  "data": {"train": "${train_set}", "eval": "${eval_set}"}, "lora": {"r": 4}, "eval_samples": 0,
                  "train": {"max_steps": 2, "micro_batch_size": 2}}},
              {"name": "online", "train": "online-dpo", "init_from": "sft", "config": {
                  "data": {"train": prompts, "eval_fraction": 0.25}, "lora": {"r": 4},
                  "rewards": [{"name": "tests.test_online_dpo:letters_e"}],
                  "online": {"rounds": 2, "steps_per_round": 1, "prompts_per_round": 2, "samples": 2,
                             "max_new_tokens": 6},
                  "train": {"micro_batch_size": 2}}},
              {"name": "gate_online", "gate": {"candidate": "online", "baseline": "sft", "rules": [
                  {"metric": "heldout/loss", "max_regression": 100.0}]}}]}
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump(wf, sort_keys=False))
    assert main(["run", str(path)]) == 0
    stages = {s["name"]: s["status"] for s in json.loads((tmp_path / "wf" / "workflow.json").read_text())["stages"]}
    assert stages["online"] == "ran" and stages["gate_online"] == "passed"
    assert (tmp_path / "wf" / "online" / "rounds" / "round-001.jsonl").exists()
