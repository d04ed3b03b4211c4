"""posttrain distill: prompt rows with answers, the seeded on/off-policy choice, the loss on completion tokens only,
the shared-base teacher (never trained, never saved), a separate teacher, the tokenizer refusal, resume."""

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import posttrain.recipes._common
from posttrain.config import load_config
from posttrain.data.collate import collate_rollouts
from posttrain.data.prompts import check_answers, load_prompts, row_answer
from posttrain.engine.resume import Resume
from posttrain.errors import ConfigError, DataError
from posttrain.losses import divergence_sum
from posttrain.methods.distill import Distill, DistillParams, is_on_policy
from posttrain.models.teacher import FrozenTeacher, tokenizer_differences
from posttrain.recipes import RECIPES
from tests.helpers import chat_rows, lora_policy, make_adapter, make_tiny, step_records, write_jsonl


def distill_cfg(tiny_dir: str, tmp_path: Path, out: Path, *extra: str):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, chat_rows(20))
    return load_config(None, [f"model.name={tiny_dir}", f"data.train={data}", f"output_dir={out}",
                              "distill.prompts_per_step=4", "distill.max_new_tokens=8",
                              "distill.eval_max_new_tokens=6", "data.eval_fraction=0.2", "train.micro_batch_size=2",
                              "train.lr=2e-3", "train.max_steps=4", "train.save_every=2", *extra], method="distill")


@pytest.fixture(scope="module")
def teacher_adapter(tiny_dir, tmp_path_factory, tokenizer) -> Path:
    out = make_adapter(tiny_dir, tmp_path_factory.mktemp("teacher") / "adapter", seed=7, targets="all-linear")
    tokenizer.save_pretrained(out)  # as a run's adapter/ holds it: the teacher's tokenizer is read from here
    return out


def test_prompt_rows_carry_their_answers(tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]},
            {"prompt": "Say yes.", "completion": "Yes."},
            {"chosen": "\n\nHuman: Say no.\n\nAssistant: No.", "rejected": "\n\nHuman: Say no.\n\nAssistant: Ok."}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    _, kept, chats, _ = load_prompts(path, tokenizer, prompt_field="prompt", system_prompt=None, max_prompt_len=64,
                                     overlong="error", chat_template=None)
    # An SFT row's prompt is the dialogue before its last answer; the answer is never part of the prompt.
    assert [c[-1]["content"] for c in chats] == ["Say hi.", "Say yes.", "Say no."]
    assert [row_answer(r, path, None, "prompt") for r in kept] == ["Hi.", "Yes.", "No."]
    check_answers(path, "prompt")
    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"prompt": "Say maybe."}])
    with pytest.raises(DataError, match=r"bad.jsonl.*row 2.*completion"):
        check_answers(bad, "prompt")


def test_rollout_kind_is_seeded_by_the_rollout_number():
    draws = [is_on_policy(0, r, 0.3) for r in range(2000)]
    assert draws == [is_on_policy(0, r, 0.3) for r in range(2000)]  # the same on a resumed run
    assert 0.27 < sum(draws) / len(draws) < 0.33
    assert not any(is_on_policy(0, r, 0.0) for r in range(50)) and all(is_on_policy(0, r, 1.0) for r in range(50))


def params(**kw) -> DistillParams:
    from posttrain.config import DistillSection
    from posttrain.recipes._common import from_section

    return from_section(DistillParams, DistillSection(**kw))


def test_loss_is_the_divergence_on_completion_tokens_only(tiny_dir, tmp_path, tokenizer):
    student = lora_policy(tiny_dir, seed=1, scale=0.3)
    other = make_tiny(tmp_path / "other", tokenizer, seed=5)
    from transformers import AutoModelForCausalLM

    teacher = FrozenTeacher(AutoModelForCausalLM.from_pretrained(other))
    prompts, comps = [[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15]]
    batch = collate_rollouts(prompts, comps, tokenizer.pad_token_id, share_prompt=False)
    p = params(divergence="jsd", beta=0.3, temperature=1.5)
    loss, metrics = Distill(p, teacher, chunk_size=3).loss_sum(student, batch)
    # By hand: the full logits of each sequence, at the positions that predict its completion tokens.
    want, fkl = 0.0, 0.0
    for prompt, comp in zip(prompts, comps):
        ids = torch.tensor([prompt + comp])
        at = slice(len(prompt) - 1, len(prompt) + len(comp) - 1)
        s, t = student(input_ids=ids).logits[0, at], teacher.model(input_ids=ids).logits[0, at]
        ones = torch.ones(len(comp))
        want += float(divergence_sum(s, t, ones, "jsd", 0.3, 1.5))
        fkl += float(divergence_sum(s, t, ones, "forward_kl"))
    assert float(loss) == pytest.approx(want, rel=1e-4)
    assert metrics["divergence"] == (pytest.approx(want, rel=1e-4), 5.0)
    assert metrics["kl"][0] == pytest.approx(fkl, rel=1e-4)
    loss.backward()
    assert all(q.grad is None for q in teacher.model.parameters())
    same = FrozenTeacher(copy.deepcopy(student))  # a teacher equal to the student: nothing to learn
    zero, m = Distill(params(divergence="reverse_kl"), same).loss_sum(student, batch)
    assert abs(float(zero)) < 1e-6 and abs(m["kl"][0]) < 1e-6


def test_tokenizer_differences_name_what_differs(tokenizer, tmp_path):
    assert tokenizer_differences(tokenizer, tokenizer, template=True) == []
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra_distill_token>"])
    other.chat_template = "{{ messages }}"
    diffs = tokenizer_differences(tokenizer, other, template=True)
    assert any("vocabulary" in d and "1 only in the teacher's" in d for d in diffs)
    assert any("chat template" in d for d in diffs)
    assert not any("chat template" in d for d in tokenizer_differences(tokenizer, other, template=False))


def test_teacher_with_another_tokenizer_is_refused_before_loading(tiny_dir, tokenizer, tmp_path, monkeypatch):
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_dir, foreign)
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"eos_token": "<|my_end|>"})
    tok.save_pretrained(foreign)

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the tokenizer check")
    monkeypatch.setattr(posttrain.recipes._common, "load_base", refuse)
    cfg = distill_cfg(tiny_dir, tmp_path, tmp_path / "out", f"distill.teacher.name={foreign}")
    with pytest.raises(ConfigError, match="cross-tokenizer distillation is out of scope") as exc:
        RECIPES["distill"].run(cfg)
    assert "eos_token" in str(exc.value) and "vocabulary" in str(exc.value)


def test_config_checks(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="nothing to distill"):
        distill_cfg(tiny_dir, tmp_path, tmp_path / "o")
    with pytest.raises(ConfigError, match="beta applies to divergence: jsd"):
        distill_cfg(tiny_dir, tmp_path, tmp_path / "o", "distill.teacher.adapter=x", "distill.divergence=forward_kl",
                    "distill.beta=0.2")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shared_base_run_keeps_the_teacher_out_and_resumes_exactly(tiny_dir, tmp_path, teacher_adapter, capsys):
    teacher_file = teacher_adapter / "adapter_model.safetensors"
    before = sha(teacher_file)
    extra = (f"distill.teacher.adapter={teacher_adapter}", "train.min_lr_ratio=1.0")
    full = tmp_path / "full"
    summary = RECIPES["distill"].run(distill_cfg(tiny_dir, tmp_path, full, *extra))
    assert "(shared base)" in capsys.readouterr().err and summary["teacher"]["mode"] == "shared base"
    metrics = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert {"divergence", "kl", "on_policy", "completion_len"} <= set(steps[0])
    # seed 0 with lmbda 0.5: rollout 0 is the rows' answers, rollouts 1-3 the student's samples
    assert [m["on_policy"] for m in steps] == [float(is_on_policy(0, r, 0.5)) for r in range(4)] == [0, 1, 1, 1]
    assert metrics[0]["step"] == 0 and {"eval/kl", "eval/teacher_nll"} <= set(metrics[0])
    assert summary["eval_after"]["step"] == 4 and summary["eval_after"]["eval/kl"] != metrics[0]["eval/kl"]
    assert len(json.loads((full / "teacher_answers.json").read_text())["answers"]) == 4
    # The teacher's adapter never trained; the student's saved adapter holds the student's weights alone.
    assert sha(teacher_file) == before
    saved = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    assert saved and not any("teacher" in k for k in saved)
    assert not (full / "adapter" / "teacher").exists()
    student_keys = {k for k in load_file(str(full / "checkpoints" / "step-0000004" / "trainable.safetensors"))}
    assert len(saved) == len(student_keys) and not any("teacher" in k for k in student_keys)
    teacher_weights = load_file(str(teacher_file))
    assert not any(torch.equal(v, teacher_weights[k]) for k, v in saved.items() if k in teacher_weights)

    part = tmp_path / "part"
    RECIPES["distill"].run(distill_cfg(tiny_dir, tmp_path, part, *extra, "train.max_steps=2"))
    RECIPES["distill"].run(distill_cfg(tiny_dir, tmp_path, part, *extra, "train.max_steps=4"),
                           resume=Resume(extend_steps=True))
    assert "from " + str(part / "teacher_answers.json") in capsys.readouterr().err.replace("\n", "")  # reused
    a, b = step_records(full, ("step", "loss", "grad_norm", "kl")), step_records(part, ("step", "loss", "grad_norm",
                                                                                        "kl"))
    assert [s for s, *_ in a] == [s for s, *_ in b] == [1, 2, 3, 4]
    for (_, la, ga, ka), (_, lb, gb, kb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-6) and ga == pytest.approx(gb, rel=1e-4) and ka == pytest.approx(kb)


def test_separate_teacher_samples_the_off_policy_sequences(tiny_dir, tmp_path, tokenizer, capsys):
    other = make_tiny(tmp_path / "teacher", tokenizer, seed=3)
    out = tmp_path / "sep"
    summary = RECIPES["distill"].run(distill_cfg(tiny_dir, tmp_path, out, f"distill.teacher.name={other}",
                                                 "distill.lmbda=0.0", "distill.off_policy=teacher",
                                                 "distill.divergence=forward_kl", "train.max_steps=2"))
    text = capsys.readouterr().err.replace("\n", "")
    assert "as a separate frozen model (the teacher has no adapter)" in text
    assert summary["teacher"]["mode"] == "separate model"
    steps = step_records(out, ("step", "on_policy", "divergence", "kl"))
    assert [s[1] for s in steps] == [0.0, 0.0]
    assert all(d == pytest.approx(k, rel=1e-5) for _, _, d, k in steps)  # forward_kl is the logged KL


def test_distill_is_a_workflow_stage_with_an_earlier_stage_as_teacher(tiny_dir, tmp_path):
    import yaml

    from posttrain.cli import main

    data = write_jsonl(tmp_path / "chats.jsonl", chat_rows(20))
    wf = {"name": "distill", "output_dir": str(tmp_path / "wf"), "model": tiny_dir,
          "eval_set": {"split": data, "fraction": 0.2},
          "evals": {"heldout": {"kind": "loss", "data": "${eval_set}"}},
          "stages": [
              {"name": "teacher", "train": "sft", "config": {
                  "data": {"train": "${train_set}", "eval": "${eval_set}"}, "lora": {"r": 4}, "eval_samples": 0,
                  "train": {"max_steps": 2, "micro_batch_size": 2}}},
              {"name": "student", "train": "distill", "config": {
                  "data": {"train": "${train_set}", "eval": "${eval_set}"}, "lora": {"r": 4},
                  "distill": {"teacher": {"adapter": "${workflow_dir}/teacher"}, "prompts_per_step": 2,
                              "max_new_tokens": 6, "eval_max_new_tokens": 4},
                  "train": {"max_steps": 2, "micro_batch_size": 2}}},
              {"name": "gate_student", "gate": {"candidate": "student", "baseline": "teacher", "rules": [
                  {"metric": "heldout/loss", "max_regression": 100.0}]}}]}
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump(wf, sort_keys=False))
    assert main(["run", str(path)]) == 0
    stages = {s["name"]: s["status"] for s in json.loads((tmp_path / "wf" / "workflow.json").read_text())["stages"]}
    assert [stages[k] for k in ("teacher", "student", "gate_student")] == ["ran", "ran", "passed"]
    summary = json.loads((tmp_path / "wf" / "student" / "summary.json").read_text())
    assert summary["teacher"]["mode"] == "shared base"
