"""The facts a model card states, read from the run folders behind an adapter; report/card.py writes the text.

The chain follows ``model.init_adapter`` down (a DPO run trained on an SFT adapter has that SFT run under it), so
the card of the last stage tells the whole story. A workflow's ``workflow.json`` (beside the stage folders) adds the
eval suites, gate verdicts and the contamination check; a running workflow passes its state instead, since its
workflow.json is written only when it ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.io import atomic_write_text, read_json, sha256_of
from posttrain.models.loading import EMBEDDED_ALIASES
from posttrain.report.card import model_card
from posttrain.runs import CONFIG_FILE, DATA_FILES, SUMMARY_FILE, data_files_of, resolve_adapter, run_config_of

CARD_FILE = "README.md"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def hub_name(base: str | None) -> str:
    """The base as a card (or a server) names it: the embedded model by its hub id."""
    return EMBEDDED_HUB_ID if base in EMBEDDED_ALIASES else str(base)


def _run_folder(adapter: str) -> Path | None:
    p = Path(adapter)
    return next((d for d in (p, p.parent) if (d / CONFIG_FILE).exists()), None)


def _data_files(run: Path, cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What the run recorded when it began; for older runs, the files' hashes now (marked as such)."""
    recorded = read_json(run / DATA_FILES)
    if recorded is not None:
        return {p: {**info, "recorded": True} for p, info in recorded.items()}
    return {p: {"sha256": sha256_of(p), "recorded": False} for p in data_files_of(cfg) if Path(p).is_file()}


def run_chain(adapter: str) -> list[dict[str, Any]]:
    """The runs behind an adapter, first first: {name, path, config, summary, data_files}."""
    chain: list[dict[str, Any]] = []
    run, seen = _run_folder(adapter), set()
    if run is None:  # a bare adapter folder: nothing recorded beyond the adapter itself
        return [{"name": resolve_adapter(adapter).name, "path": str(adapter), "config": {}, "summary": {},
                 "data_files": {}}]
    while run is not None and run.resolve() not in seen:
        seen.add(run.resolve())
        cfg = run_config_of(str(run))
        chain.insert(0, {"name": run.name, "path": str(run), "config": cfg,
                         "summary": read_json(run / SUMMARY_FILE) or {}, "data_files": _data_files(run, cfg)})
        init = (cfg.get("model") or {}).get("init_adapter")
        run = _run_folder(init) if init else None
    return chain


def workflow_of(chain: list[dict[str, Any]]) -> dict[str, Any] | None:
    """workflow.json beside the last run, when that run is one of its stages."""
    last = Path(chain[-1]["path"])
    wf = read_json(last.parent / "workflow.json")
    if wf and any(r.get("name") == last.name for r in wf.get("stages", [])):
        return wf
    return None


def write_card(dest: Path, adapter: str, *, base: str | None, kind: str, export: dict[str, Any],
               workflow: dict[str, Any] | None = None) -> Path:
    """README.md in ``dest`` (a merge or export folder), from the run folders behind ``adapter``."""
    chain = run_chain(adapter)
    facts = {"base_model": hub_name(base), "kind": kind, "export": export, "chain": chain,
             "workflow": workflow if workflow is not None else workflow_of(chain)}
    atomic_write_text(dest / CARD_FILE, model_card(facts))
    return dest / CARD_FILE
