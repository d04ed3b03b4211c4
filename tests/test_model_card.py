"""Model cards: `merge` and `export` write README.md (Hugging Face front matter and sections) from the run folder,
and its numbers are the run's own (parsed back and compared with summary.json, data_files.json and the data)."""

import hashlib
import json
import re

import pytest
import yaml

from posttrain.cli import main
from posttrain.report.card import model_card
from tests.helpers import chat_rows, write_jsonl


def parse_card(text: str) -> tuple[dict, dict[str, list[list[str]]]]:
    """(front matter, section title -> table rows as cell lists) of a card."""
    _, front, body = text.split("---\n", 2)
    tables: dict[str, list[list[str]]] = {}
    title = None
    for line in body.splitlines():
        if line.startswith("#"):
            title = line.lstrip("# ").strip()
        elif line.startswith("| ") and not line.startswith("|---"):
            tables.setdefault(title, []).append([c.strip() for c in line.strip("|").split(" | ")])
    return yaml.safe_load(front), {k: v[1:] for k, v in tables.items()}  # drop each table's header row


@pytest.fixture(scope="module")
def sft_run(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("card")
    data = write_jsonl(tmp / "train.jsonl", chat_rows(24))
    cfg = tmp / "sft.yaml"
    cfg.write_text(f"model: {{name: {tiny_dir}}}\ndata: {{train: {data}, eval_fraction: 0.25}}\n"
                   f"output_dir: {tmp / 'sft'}\ntrain: {{max_steps: 2, micro_batch_size: 4, lr: 0.01}}\n"
                   "eval_samples: 0\nlora: {r: 4, alpha: 8}\n"
                   "card: {intended_use: 'Extracting contact cards in tests.', license: apache-2.0}\n")
    assert main(["sft", str(cfg)]) == 0
    return tmp / "sft", data


def test_export_card_numbers_equal_the_run_folder(sft_run, tmp_path, tiny_dir):
    run, data = sft_run
    assert main(["export", str(run), "--out", str(tmp_path / "peft")]) == 0
    front, tables = parse_card((tmp_path / "peft" / "README.md").read_text())
    assert front["base_model"] == tiny_dir and front["library_name"] == "peft"
    assert front["license"] == "apache-2.0" and front["tags"] == ["posttrain", "sft", "lora"]
    assert "Extracting contact cards in tests." in (tmp_path / "peft" / "README.md").read_text()

    summary = json.loads((run / "summary.json").read_text())
    rows = {r[0]: r[1:] for r in tables["sft"]}  # the held-out table of stage "sft": metric | before | after
    assert set(rows) == {k for k in summary["eval_after"] if k.startswith("eval/")} >= {"eval/loss"}
    for metric, (before, after) in rows.items():
        assert float(before) == pytest.approx(summary["eval_before"][metric], rel=1e-5)
        assert float(after) == pytest.approx(summary["eval_after"][metric], rel=1e-5)

    (stage, path, sha, n, unit, when), = tables["Training data"]
    assert (stage, path, unit, when) == ("sft", data, "rows", "at training")
    assert sha == hashlib.sha256(open(data, "rb").read()).hexdigest()
    assert int(n) == 24 and re.match(rf"{re.escape(data)}: 24 rows", summary["data"][0])
    config = {r[0]: r[1] for r in tables["sft: SFT (LoRA)"]}
    assert (config["lora.r"], config["lora.alpha"], config["train.lr"], config["train.max_steps"]) == \
        ("4", "8", "0.01", "2")
    export = {r[0]: r[1] for r in tables["Export check"]}
    report = json.loads((tmp_path / "peft" / "export_report.json").read_text())
    assert int(export["tensors"]) == report["tensors"]


def test_merge_card_states_the_reload_check(sft_run, tmp_path):
    run, _ = sft_run
    assert main(["merge", str(run), "--out", str(tmp_path / "merged"), "--max-new-tokens", "4"]) == 0
    front, tables = parse_card((tmp_path / "merged" / "README.md").read_text())
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())["reloaded_vs_base_plus_adapter"]
    check = {r[0]: r[1] for r in tables["Export check"]}
    assert front["library_name"] == "transformers"
    assert float(check["max abs logit diff"]) == pytest.approx(report["max_abs_logit_diff"], rel=1e-5)
    assert check["greedy identical"] == f"{report['greedy_identical']}/{report['prompts']}"


def _stage(name: str, method: str, **cfg) -> dict:
    return {"name": name, "path": f"/runs/{name}", "config": {"method": method, **cfg},
            "summary": {"data": [f"/d/{name}.jsonl: 8 pairs, 8 kept, 90 tokens"], "eval_before": {"step": 0},
                        "eval_after": {"step": 2}, "steps": 2},
            "data_files": {f"/d/{name}.jsonl": {"sha256": "ab" * 32, "recorded": True}}}


def test_a_workflow_chain_gates_and_contamination_are_all_on_the_card():
    gate = {"name": "gate_dpo", "candidate": "dpo", "baseline": "sft", "passed": False,
            "checks": [{"metric": "prefs/accuracy", "rule": "max_regression 0.01", "baseline": 0.75,
                        "candidate": 0.5, "change": -0.25, "passed": False, "note": ""}]}
    wf = {"name": "tiny", "eval_set": "/wf/data/eval.jsonl", "eval_set_sha256": "0123456789abcdef",
          "contamination": "none: no held-out row shares >= 50% of its 8-grams with /wf/data/train.jsonl",
          "suites": {"heldout": {"kind": "loss", "data": "/wf/data/eval.jsonl"},
                     "prefs": {"kind": "preference", "data": "/d/p.jsonl"}},
          "stages": [{"name": "sft", "status": "ran", "detail": "sft -> /wf/sft"}],
          "evals": {"columns": ["baseline", "sft", "dpo"], "higher_is_better": {"heldout/loss": False},
                    "rows": {"heldout/loss": {"baseline": 2.5, "sft": 1.25, "dpo": 1.5}}},
          "gates": [gate]}
    chain = [_stage("sft", "sft", lora={"r": 4}), _stage("dpo", "dpo", dpo={"beta": 0.1, "loss": "dpo"})]
    export = {"quant": "q8_0", "file": "model-q8_0.gguf", "bytes": 10, "bits_per_weight": 8.5,
              "gguf_vs_base_plus_adapter": {"max_abs_logit_diff": 0.5, "mean_abs_logit_diff": 0.05,
                                            "greedy_identical": 7, "prompts": 8, "top1_agreement": 0.98},
              "tokenizer": {"ids_identical": 8, "prompts": 8, "chat_template_identical": True},
              "within_tolerance": True}
    text = model_card({"base_model": "b", "kind": "gguf", "export": export, "chain": chain, "workflow": wf})
    front, tables = parse_card(text)
    assert front["tags"] == ["posttrain", "sft", "dpo", "lora", "gguf"] and front["library_name"] == "gguf"
    assert "SFT (LoRA) → DPO (LoRA) → GGUF q8_0, from `b`" in text
    assert tables["Eval suites"] == [["heldout/loss", "in-domain (held-out set)", "no", "2.5", "1.25", "1.5"]]
    assert tables["Gate gate_dpo: BLOCKED (dpo vs sft)"][0][:6] == ["prefs/accuracy", "max_regression 0.01", "0.75",
                                                                    "0.5", "-0.25", "no"]
    assert "sha256 0123456789abcdef): none: no held-out row shares" in text
    assert {r[1]: r[3] for r in tables["Training data"]} == {"/d/sft.jsonl": "8", "/d/dpo.jsonl": "8"}
    assert ["dpo.beta", "0.1"] in tables["dpo: DPO (LoRA)"]
    assert "Not stated by the run: set `card.intended_use`" in text
    assert ["top-1 agreement along the reference's answers", "0.98"] in tables["Export check"]
