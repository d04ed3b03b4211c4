"""Every command end to end on a tiny model: sft, eval, generate, chat, render; errors exit 2 with a clear line."""

import io
import json

import pytest

from posttrain.cli import main
from tests.helpers import chat_rows, write_jsonl


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    data = write_jsonl(tmp / "train.jsonl", chat_rows(30))
    cfg = tmp / "sft.yaml"
    cfg.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {data}, eval_fraction: 0.2}}\n"
                   f"output_dir: {tmp / 'run'}\ntrain: {{max_steps: 2, micro_batch_size: 2}}\neval_samples: 1\n")
    assert main(["sft", str(cfg), "lora.r=4"]) == 0
    return tmp / "run", cfg


def test_sft_writes_a_peft_adapter_config_and_metrics(run_dir):
    run, _ = run_dir
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml",
                 "metrics.jsonl", "summary.json", "samples.jsonl"):
        assert (run / name).exists(), name
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "eval/loss" in records[0]  # step-0 baseline
    assert any("loss" in r and r["step"] == 2 for r in records)


def test_adapter_loads_back_with_peft(run_dir, tiny_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _ = run_dir
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert not torch.allclose(tuned, plain)  # the adapter trained and carries weights


def test_eval_run_and_base(run_dir, capsys):
    run, _ = run_dir
    assert main(["eval", str(run), "--samples", "1"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["adapter"] and tuned["eval/tokens"] > 0 and len(tuned["samples"]) == 1
    assert main(["eval", str(run), "--base", "--samples", "0"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["adapter"] is None and base["eval/loss"] != tuned["eval/loss"]


def test_generate_and_chat(run_dir, capsys, monkeypatch):
    run, _ = run_dir
    assert main(["generate", "--adapter", str(run), "--prompt", "hi", "--max-new-tokens", "3", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "hi" and isinstance(line["output"], str)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/reset\nagain\n/exit\n"))
    assert main(["chat", "--adapter", str(run), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2


def test_render_highlights_trained_tokens(run_dir, capsys):
    _, cfg = run_dir
    assert main(["render", str(cfg), "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert "row 1" in out and "trained" in out


def test_errors_exit_2_with_file_row_field(tmp_path, tiny_dir, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                             {"role": "assistant", "content": 3}]}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {bad}}}\noutput_dir: {tmp_path / 'o'}\n")
    assert main(["sft", str(cfg)]) == 2
    assert f"{bad}, row 1, field 'messages[1].content': expected a string, got int" in capsys.readouterr().err
    assert main(["sft", str(cfg), "train.lerning_rate=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_the_data_parser_names_the_curate_tables_without_importing_torch():
    import subprocess
    import sys

    from posttrain.cli import data
    from posttrain.curate.audit import UNITS
    from posttrain.curate.prm_labels import LABELS, SOLUTIONS
    from posttrain.data.steps import STEP_SPLITS

    assert set(data.LABEL_CHOICES) == set(LABELS) and set(data.SOLUTION_CHOICES) == set(SOLUTIONS)
    assert set(data.STEP_SPLIT_CHOICES) == set(STEP_SPLITS) and set(data.UNIT_CHOICES) == set(UNITS)
    probe = "import sys; from posttrain.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
