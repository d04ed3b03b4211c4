"""A few checks on the real embedded model (SmolLM2-135M-Instruct)."""

import json

import pytest
import torch

from posttrain.models import apply_lora, load_model, trainable_report
from posttrain.rollout import generate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedded():
    return load_model(None)


def test_embedded_model_answers(embedded):
    assert embedded.dtype == torch.float32  # CPU: fp32, never the 170x slower bf16
    assert embedded.model.config.num_hidden_layers == 30 and embedded.model.config.vocab_size == 49152
    out = generate(embedded.model, embedded.tokenizer,
                   [[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=16)
    assert "Paris" in out[0]


def test_lora_trainable_report_all_linear(embedded):
    import copy

    model = apply_lora(copy.deepcopy(embedded.model), r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    rep = trainable_report(model)
    # per layer: r * (in + out) summed over q,k,v,o,gate,up,down of SmolLM2 (576 hidden, 192 kv, 1536 mlp)
    per_layer = 16 * ((576 + 576) + (576 + 192) * 2 + (576 + 576) + (576 + 1536) * 3)
    assert rep["trainable"] == 30 * per_layer
    assert rep["by_module"]["q_proj.lora_A"] == 30 * 16 * 576


def test_demo_quick_runs_the_workflow_with_before_and_after(tmp_path):
    from posttrain.demo import main

    code = main(str(tmp_path / "demo"), quick=True)
    wf = json.loads((tmp_path / "demo" / "workflow.json").read_text())
    rows, cols = wf["evals"]["rows"], wf["evals"]["columns"]
    assert cols[:2] == ["baseline", "sft"]
    # 6 SFT steps at lr 1e-3 already lower the held-out loss of the cards a lot
    assert rows["cards_loss/loss"]["sft"] < 0.8 * rows["cards_loss/loss"]["baseline"]
    assert {"calibration/ece", "abstention/abstention_rate", "general/contains"} <= set(rows)
    assert (tmp_path / "demo" / "report.html").exists()
    assert code == (0 if all(g["passed"] for g in wf["gates"]) else 1)


def test_a_harmful_sft_is_blocked_by_its_gate(tmp_path, capsys):
    """SFT on shuffled answers (each person's sentence paired with another person's card) learns the format but not
    the task: the gate that asks for a lift over the prompt-only baseline blocks it, with a table and exit 1."""
    import yaml

    from posttrain.cli import main
    from posttrain.demo import SYSTEM_PROMPT, make_rows

    rows = make_rows(40, seed=1)
    answers = [r["messages"][1] for r in rows]
    shuffled = [{"messages": [r["messages"][0], answers[(i + 1) % len(rows)]]} for i, r in enumerate(rows)]
    train = tmp_path / "shuffled.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in shuffled))
    held = tmp_path / "eval.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in make_rows(6, seed=2)))
    wf = {"name": "harmful", "output_dir": str(tmp_path / "wf"), "eval_set": {"file": str(held)},
          "baseline": {"system_prompt": SYSTEM_PROMPT},
          "evals": {"cards": {"kind": "generation", "data": "${eval_set}",
                              "options": {"scorer": "json_exact", "max_new_tokens": 40}}},
          "stages": [{"name": "sft", "train": "sft", "config": {
                          "data": {"train": str(train), "eval": "${eval_set}"}, "eval_samples": 0,
                          "train": {"lr": 1e-3, "max_steps": 8, "micro_batch_size": 2}}},
                     {"name": "gate_sft", "gate": {"candidate": "sft", "rules": [
                         {"metric": "cards/json_exact", "min_lift": 0.05}]}},
                     {"name": "export", "export": "sft"}]}
    path = tmp_path / "workflow.yaml"
    path.write_text(yaml.safe_dump(wf))
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "BLOCKED" in err and "cards/json_exact" in err
    result = json.loads((tmp_path / "wf" / "workflow.json").read_text())
    assert result["gates"][0]["passed"] is False
    assert not (tmp_path / "wf" / "export").exists()


def test_qlora_sft_and_merge_on_embedded(tmp_path):
    """examples/sft-qlora.yaml for 3 steps: the base's linear weights drop ~4x against bf16, and the adapter merged
    into the de-quantized base answers the 8 check prompts exactly as the 4-bit base + adapter does."""
    from pathlib import Path

    from posttrain.cli import main

    root = Path(__file__).resolve().parent.parent
    run = tmp_path / "qlora"
    assert main(["sft", str(root / "examples" / "sft-qlora.yaml"), f"output_dir={run}", "train.max_steps=3",
                 f"data.train={root / 'examples' / 'data' / 'contact-cards.jsonl'}", "eval_samples=0",
                 "train.save_every=null"]) == 0
    b = json.loads((run / "summary.json").read_text())["base_weight_bytes"]
    assert b["quantized_params"] == 30 * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536)
    assert 3.8 < b["quantized_as_dense"] / b["quantized"] < 4.0
    assert main(["merge", str(run), "--out", str(tmp_path / "merged"), "--max-new-tokens", "12"]) == 0
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    check = report["reloaded_vs_base_plus_adapter"]
    assert check["greedy_identical"] == check["prompts"] == 8
    assert check["max_abs_logit_diff"] < 1e-2
