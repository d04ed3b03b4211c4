"""report.html: one self-contained page per run (curves, before/after evals, config, samples) and per workflow.

Inline SVG and CSS only, no script and no external URL, so the page opens from disk, from a copied folder or from
a CI artifact with nothing else around it.

Layer 6: may import io, engine.logging (read_metrics) and errors; never config or eval.
"""

from posttrain.report.run_page import run_figures, run_report_html, write_run_report
from posttrain.report.svg import COLOURS, eval_bars_svg, panels_svg, write_online_plot, write_watch_plot
from posttrain.report.workflow_page import workflow_report_html, write_workflow_report

__all__ = ["COLOURS", "eval_bars_svg", "panels_svg", "run_figures", "run_report_html", "workflow_report_html",
           "write_online_plot", "write_run_report", "write_watch_plot", "write_workflow_report"]
