"""After training: merge an adapter into a standalone model folder, or export it (the adapter alone in PEFT format,
or the merged model as GGUF), every form checked against the base + adapter it came from.

Each command takes an adapter folder or a run folder and writes its folder atomically with a report
(``merge_report.json`` / ``export_report.json``) of what was compared and how closely it matched. A package rather
than one module because each format's writing and checking is a story of its own: ``merge``, ``adapter`` (PEFT),
``gguf_export``, over the shared ``checks``.
"""

from posttrain.ship.adapter import export_run, serving_warnings
from posttrain.ship.checks import CHECK_PROMPTS, REPORTS
from posttrain.ship.gguf_export import export_gguf
from posttrain.ship.merge import merge_run

# `posttrain export --format NAME`: each takes (adapter, out, model_name=, dtype=, device=) and its own options.
EXPORT_FORMATS = {"peft": export_run, "gguf": export_gguf}

__all__ = ["CHECK_PROMPTS", "EXPORT_FORMATS", "REPORTS", "export_gguf", "export_run", "merge_run",
           "serving_warnings"]
