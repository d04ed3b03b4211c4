"""The model card (README.md in Hugging Face's format: YAML front matter, then sections) of a merged or exported
model, built only from what its run folders recorded: nothing in it is written by hand.

Pure: ``model_card(facts)`` takes the dicts that ship/card.py reads from the run folders (config.yaml,
summary.json, data_files.json, the export report, a workflow's workflow.json) and returns the text. ``facts``:
  base_model   the base's hub id or path
  kind         "merged" | "peft" | "gguf"
  export       the merge/export report (the check's numbers)
  chain        the training stages, first first: {name, config, summary, data_files}; a DPO run trained on an SFT
               adapter (model.init_adapter) has the SFT run before it
  workflow     workflow.json when the run was a workflow stage, else None
Layer 6: imports nothing from posttrain.
"""

from __future__ import annotations

import re
from typing import Any

_LIBRARY = {"merged": "transformers", "peft": "peft", "gguf": "gguf"}
# summary.json's data lines start "<file>: <count> rows|pairs|prompts|..."; the count is the rows the file held.
_DATA_LINE = re.compile(r"^(?P<file>.+?): (?P<rows>\d+) (?P<unit>rows|pairs|prompts|examples)\b")


def fmt(value: Any) -> str:
    """One table cell: numbers to 6 significant digits (tests parse them back), None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(fmt(c) for c in r) + " |" for r in rows)]


def _front_matter(facts: dict[str, Any]) -> list[str]:
    import yaml  # only here: the card is written once per export

    chain = facts["chain"]
    card = {}
    for stage in chain:  # a later stage's statement wins over an earlier one's
        card.update({k: v for k, v in (stage["config"].get("card") or {}).items() if v})
    methods = [s["config"].get("method") for s in chain]
    tags = ["posttrain", *dict.fromkeys(m for m in methods if m)]
    if any(s["config"].get("finetune", "lora") == "lora" for s in chain):
        tags.append("lora")
    if facts["kind"] == "gguf":
        tags.append("gguf")
    meta = {"base_model": facts["base_model"], "library_name": _LIBRARY[facts["kind"]], "tags": tags,
            "pipeline_tag": "text-generation"}
    if card.get("license"):
        meta["license"] = card["license"]
    if card.get("datasets"):
        meta["datasets"] = list(card["datasets"])
    return ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---"], card.get("intended_use")


def _stage_title(stage: dict[str, Any]) -> str:
    cfg = stage["config"]
    how = "LoRA" if cfg.get("finetune", "lora") == "lora" else "full"
    if (cfg.get("model") or {}).get("quantization", "none") != "none":
        how = f"QLoRA ({cfg['model']['quantization']})"
    return f"{str(cfg.get('method', '?')).upper()} ({how})"


def _export_line(facts: dict[str, Any]) -> str:
    e = facts["export"]
    if facts["kind"] == "gguf":
        return f"GGUF {e.get('quant')}"
    return "merged HF model" if facts["kind"] == "merged" else "PEFT adapter"


def _data_section(chain: list[dict[str, Any]]) -> list[str]:
    rows = []
    for stage in chain:
        counts = {}
        for line in stage["summary"].get("data") or []:
            if m := _DATA_LINE.match(line):
                counts[m["file"]] = (int(m["rows"]), m["unit"])
        for path, info in (stage.get("data_files") or {}).items():
            n, unit = counts.get(path, (None, "rows"))
            rows.append([stage["name"], path, info.get("sha256"), n, unit,
                         "at training" if info.get("recorded") else "at export (the run recorded none)"])
    lines = ["## Training data", ""]
    header = ["stage", "file", "sha256", "rows", "unit", "hashed"]
    lines += _table(header, rows) if rows else ["No data files recorded."]
    reports = [(s["name"], line) for s in chain for line in s["summary"].get("data") or []]
    if reports:
        lines += ["", "What each run read (its own report):", "", *(f"- {name}: {line}" for name, line in reports)]
    return lines


_KEY_CONFIG = {"model": ("quantization", "init_adapter"), "lora": ("r", "alpha", "dropout", "target_modules"),
               "train": ("lr", "epochs", "max_steps", "micro_batch_size", "grad_accum", "warmup_ratio", "optimizer"),
               "data": ("max_seq_len", "packing", "eval_fraction", "system_prompt")}


def _config_rows(cfg: dict[str, Any]) -> list[list[Any]]:
    rows = [["finetune", cfg.get("finetune", "lora")]]
    for section, keys in _KEY_CONFIG.items():
        if section == "lora" and cfg.get("finetune", "lora") != "lora":
            continue
        values = cfg.get(section) or {}
        rows += [[f"{section}.{k}", values[k]] for k in keys if values.get(k) not in (None, "none")]
    method = cfg.get("method")
    own = cfg.get(method) if isinstance(cfg.get(method), dict) else {}
    rows += [[f"{method}.{k}", v] for k, v in own.items() if not isinstance(v, (dict, list))]
    rows += [[k, cfg[k]] for k in ("kl_to_base",) if cfg.get(k)]
    return rows


def _method_section(chain: list[dict[str, Any]]) -> list[str]:
    lines = ["## Method and key config"]
    for stage in chain:
        lines += ["", f"### {stage['name']}: {_stage_title(stage)}", ""]
        lines += _table(["setting", "value"], _config_rows(stage["config"]))
        s = stage["summary"]
        lines += ["", f"{fmt(s.get('steps'))} steps in {fmt(s.get('seconds'))} s; {fmt(s.get('trainable'))} of "
                      f"{fmt(s.get('total_params'))} parameters trained; final loss {fmt(s.get('final_loss'))}."]
    return lines


def _eval_section(chain: list[dict[str, Any]]) -> list[str]:
    lines = ["## Evaluation", "", "Held-out metrics each run logged before its first and after its last step:"]
    for stage in chain:
        before, after = stage["summary"].get("eval_before") or {}, stage["summary"].get("eval_after") or {}
        metrics = [k for k in {**before, **after} if k.startswith("eval/") and
                   isinstance(before.get(k, after.get(k)), (int, float))]
        lines += ["", f"### {stage['name']}", ""]
        if not metrics:
            lines.append("No held-out evaluation was logged.")
            continue
        header = ["metric", f"before (step {fmt(before.get('step'))})", f"after (step {fmt(after.get('step'))})"]
        lines += _table(header, [[k, before.get(k), after.get(k)] for k in metrics])
    return lines


def _workflow_sections(wf: dict[str, Any]) -> list[str]:
    lines = ["## Workflow", "", f"The workflow `{wf.get('name')}` ran these stages:", ""]
    lines += _table(["stage", "status", "detail"],
                    [[r["name"], r["status"], r["detail"]] for r in wf.get("stages", [])])
    table = wf.get("evals") or {}
    if table.get("rows"):
        suites = wf.get("suites") or {}

        def axis(metric: str) -> str:
            spec = suites.get(metric.split("/", 1)[0])
            if not spec:
                return "—"
            return "in-domain (held-out set)" if spec["data"] == wf.get("eval_set") else "out-of-domain (forgetting)"

        lines += ["", "### Eval suites", ""]
        cols = table["columns"]
        lines += _table(["metric", "suite", "higher is better", *cols],
                        [[m, axis(m), table["higher_is_better"].get(m), *(v.get(c) for c in cols)]
                         for m, v in table["rows"].items()])
    for gate in wf.get("gates") or []:
        lines += ["", f"### Gate {gate['name']}: {'PASSED' if gate['passed'] else 'BLOCKED'} ({gate['candidate']} vs "
                      f"{gate['baseline']})", ""]
        lines += _table(["metric", "rule", "baseline", "candidate", "change", "passed", "note"],
                        [[c["metric"], c["rule"], c["baseline"], c["candidate"], c["change"], c["passed"],
                          c.get("note") or ""] for c in gate["checks"]])
    lines += ["", "### Contamination", "", f"Held-out set {fmt(wf.get('eval_set'))} (sha256 "
              f"{fmt(wf.get('eval_set_sha256'))}): {fmt(wf.get('contamination', 'not recorded'))}."]
    return lines


def _export_section(facts: dict[str, Any]) -> list[str]:
    e, kind = facts["export"], facts["kind"]
    lines = ["## Export check", ""]
    if kind == "gguf":
        c, t = e["gguf_vs_base_plus_adapter"], e["tokenizer"]
        lines += _table(["check", "value"], [
            ["file", e["file"]], ["quantization", e["quant"]], ["bytes", e["bytes"]],
            ["bits per weight", e["bits_per_weight"]], ["max abs logit diff", c["max_abs_logit_diff"]],
            ["mean abs logit diff", c["mean_abs_logit_diff"]],
            ["top-1 agreement along the reference's answers", c["top1_agreement"]],
            ["greedy identical", f"{c['greedy_identical']}/{c['prompts']}"],
            ["tokenizer ids identical", f"{t['ids_identical']}/{t['prompts']}"],
            ["chat template identical", t["chat_template_identical"]],
            ["within tolerance", e["within_tolerance"]]])
        lines += ["", "The file was read back through transformers' GGUF loader and compared with base + adapter on "
                      "fixed check prompts."]
    elif kind == "merged":
        c = e["reloaded_vs_base_plus_adapter"]
        lines += _table(["check", "value"], [["max abs logit diff", c["max_abs_logit_diff"]],
                                             ["mean abs logit diff", c["mean_abs_logit_diff"]],
                                             ["greedy identical", f"{c['greedy_identical']}/{c['prompts']}"]])
    else:
        lines += _table(["check", "value"], [["tensors", e["tensors"]], ["rank", e.get("rank")],
                                             ["alpha", e.get("alpha")],
                                             ["max abs diff after reload", e["max_abs_diff_after_reload"]]])
        notes = [f"- note: {n}" for n in e.get("notes") or []]
        lines += ["", *notes] if notes else []
    return lines


def model_card(facts: dict[str, Any]) -> str:
    """README.md text for one merged or exported model."""
    chain = facts["chain"]
    head, intended = _front_matter(facts)
    story = " → ".join([*(_stage_title(s) for s in chain), _export_line(facts)])
    lines = [*head, "", f"# {chain[-1]['name']}", "",
             f"{story}, from `{facts['base_model']}`, trained with posttrain.", "",
             "## Intended use", "",
             intended or "Not stated by the run: set `card.intended_use` in its config to say what it is for.", "",
             "## Base model", "", f"`{facts['base_model']}`"
             + (f", in 4 bits ({chain[0]['config']['model']['quantization']}) while training"
                if (chain[0]["config"].get("model") or {}).get("quantization", "none") != "none" else ""), "",
             *_data_section(chain), "", *_method_section(chain), "", *_eval_section(chain)]
    if facts.get("workflow"):
        lines += ["", *_workflow_sections(facts["workflow"])]
    lines += ["", *_export_section(facts), ""]
    return "\n".join(lines)
