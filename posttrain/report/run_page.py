"""report.html of one run folder: curves, before/after evals, config and samples on one self-contained page.

Layer 6 (report): imports io, engine.logging, report.html and report.svg.
"""

from __future__ import annotations

import re
from html import escape
from pathlib import Path
from typing import Any, Callable

from posttrain.engine.logging import read_metrics
from posttrain.io import atomic_write_text, read_complete_jsonl, read_json
from posttrain.report.html import better, cell_class, fmt, number, page, seconds, table
from posttrain.report.svg import COLOURS, panels_svg

# Each figure: (title, [(panel title, [metric keys or key predicates])]); a panel or a figure with no key present
# is left out, so one table serves every method.
Matcher = Callable[[str], bool]
_Spec = list[tuple[str, list[tuple[str, list[str | Matcher]]]]]


def _prefix(p: str) -> Matcher:
    return lambda k: k.startswith(p)


FIGURES: _Spec = [
    ("loss and learning rate", [
        ("loss", ["loss", "eval/loss"]),
        ("policy and value loss", ["policy_loss", "value_loss"]),
        ("held-out perplexity", ["eval/ppl"]),
        ("learning rate", ["lr"]),
    ]),
    ("rewards and margins", [
        ("chosen and rejected rewards", ["rewards/chosen", "rewards/rejected", "eval/rewards/chosen",
                                         "eval/rewards/rejected"]),
        ("desirable and undesirable rewards (KTO)", ["rewards/desirable", "rewards/undesirable",
                                                     "eval/rewards/desirable", "eval/rewards/undesirable"]),
        ("reward margin", ["rewards/margin", "eval/rewards/margin"]),
        ("chosen and rejected scores", ["score/chosen", "score/rejected", "eval/score_chosen", "eval/score_rejected"]),
        ("score margin", ["score/margin"]),
        ("held-out score spread", ["eval/score_p90", "eval/score_mean", "eval/score_p10"]),
        ("held-out score against response length (correlation)", ["eval/length_corr"]),
        ("accuracy", ["accuracy", "eval/accuracy"]),
        ("steps (process reward model): accuracy, AUROC, first error", [
            "step_accuracy", "eval/step_accuracy", "eval/auroc", "eval/first_error_accuracy",
            "eval/all_correct_accuracy"]),
        ("held-out step probability: good and bad steps", ["eval/p_good", "eval/p_bad"]),
        ("log-probs", ["logps/chosen", "logps/rejected", "eval/logps/chosen", "eval/logps/rejected"]),
    ]),
    ("KL", []),  # one panel per KL quantity, its training and held-out curves together: see _kl_panels
    ("reward curves", [
        ("reward (trained on)", ["reward", "eval/reward", "score_shaped"]),
        ("reward terms", [lambda k: bool(re.fullmatch(r"(eval/)?reward/.+", k))]),
        ("watch (never trained on)", ["watch", "eval/watch", _prefix("watch/"), _prefix("eval/watch/")]),
        ("critic: value and return", ["value_mean", "return_mean", _prefix("critic/")]),
        ("KL penalty in the reward", ["non_score_reward"]),
        ("reward spread in a group", ["reward_std"]),
        ("completion length", ["completion_len", "eval/completion_len"]),
        ("clipped and truncated fraction", ["clip_fraction", "truncated"]),
    ]),
    ("online DPO rounds", [  # methods.online_dpo
        ("samples' scores: all, chosen, rejected", ["online/sample_score", "online/chosen_score",
                                                    "online/rejected_score"]),
        ("held-out win rate against the starting policy (judge)", ["eval/win_rate", "eval/wins", "eval/losses",
                                                                   "eval/ties", "eval/inconsistent"]),
        ("pairs kept and dropped per round", ["online/kept", "online/tie", "online/inconsistent",
                                              "online/intransitive", "online/kept_share"]),
    ]),
    ("rollout engine", [  # rollout.engines; losses.offpolicy
        ("train-inference mismatch |logp_train - logp_engine|", ["mismatch/abs_mean", "mismatch/abs_max"]),
        ("mismatch KL(engine || train)", ["mismatch/kl"]),
        ("importance weights (mean, share cut at the cap)", ["mismatch/is_weight", "mismatch/is_capped"]),
        ("sampling and weight-sync seconds per rollout", ["rollout/sample_s", "rollout/sync_s"]),
        ("policy updates between sampling and training (async_ahead)", ["rollout/lag"]),
    ]),
    ("optimisation and throughput", [
        ("gradient norm", ["grad_norm"]),
        ("tokens per second", ["tokens_per_s"]),
    ]),
]


def _kl_panels(keys: list[str]) -> list[tuple[str, list[str | Matcher]]]:
    names = dict.fromkeys(k.removeprefix("eval/") for k in keys if "kl" in k.lower() and not k.startswith("mismatch/"))
    return [(name, [name, f"eval/{name}"]) for name in names]


def _keys_for(matchers: list[str | Matcher], keys: list[str]) -> list[str]:
    out: list[str] = []
    for m in matchers:
        found = [m] if isinstance(m, str) and m in keys else \
            sorted((k for k in keys if not isinstance(m, str) and m(k)), key=lambda k: k.startswith("eval/"))
        out += [k for k in found if k not in out]
    return out


def run_figures(records: list[dict[str, Any]], title: str = "") -> tuple[list[str], list[str]]:
    """The SVG figures of a run's metrics records, and the numeric keys no panel shows."""
    keys = [k for r in records for k, v in r.items() if k != "step" and number(v) is not None]
    keys = list(dict.fromkeys(keys))
    shown: set[str] = set()
    figures = []
    for fig_title, panel_specs in FIGURES:
        panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for panel_title, matchers in panel_specs or _kl_panels(keys):
            series: dict[str, list[tuple[float, float]]] = {}
            for k in _keys_for(matchers, keys):
                pts = [(float(r["step"]), float(r[k])) for r in records if "step" in r and number(r.get(k)) is not None]
                same = next((label for label, other in series.items() if other == pts), None)
                if same:  # e.g. watch and its only term watch/x: one line, both names
                    series[f"{same} = {k}"] = series.pop(same)
                elif pts and len(series) < len(COLOURS):  # more lines than colours would be unreadable
                    series[k] = pts
                else:
                    continue
                shown.add(k)
            if series:
                panels[panel_title] = series
        if panels:
            figures.append(panels_svg(f"{title}: {fig_title}" if title else fig_title, panels))
    return figures, [k for k in keys if k not in shown]


def _method(config_text: str) -> str:
    m = re.search(r"^method:\s*(\S+)", config_text, re.M)
    return m.group(1) if m else "run"


def curves_html(run_dir: Path, title: str) -> str:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return f'<p class="note">no metrics.jsonl in {escape(str(run_dir))}</p>'
    figures, rest = run_figures(read_complete_jsonl(metrics), title)  # the run may be writing its last line
    html = "\n".join(f"<figure>{svg}</figure>" for svg in figures) or '<p class="note">no metric to plot</p>'
    if rest:
        html += f'<p class="note">also logged, not plotted: {escape(", ".join(rest))}</p>'
    return html


def _before_after(summary: dict[str, Any]) -> str:
    before, after = summary.get("eval_before") or {}, summary.get("eval_after") or {}
    metrics = [k for k in dict.fromkeys([*before, *after]) if k != "step"]
    if not metrics:
        return '<p class="note">no held-out evaluation in summary.json</p>'
    rows = []
    for k in metrics:
        b, a = before.get(k), after.get(k)
        change = a - b if number(a) is not None and number(b) is not None else None
        rows.append([escape(k), f'<td class="num">{fmt(b)}</td>', f'<td class="num">{fmt(a)}</td>',
                     f'<td class="{cell_class(a, b, better(k))}">{fmt(change, signed=True)}</td>'])
    head = ["metric", f"before (step {fmt(before.get('step'))})", f"after (step {fmt(after.get('step'))})", "change"]
    return table(head, rows)


def _samples(run_dir: Path) -> str:
    path = run_dir / "samples.jsonl"
    if not path.exists():
        return ""
    rows = read_metrics(path)
    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["prompt", "reference", "output"]
    body = [[f'<td class="text"><div>{escape(str(r.get(c, "")))}</div></td>' for c in cols] for r in rows]
    return "<h2>samples (held-out, greedy)</h2>\n" + table(map(escape, cols), body)


def _rounds(summary: dict[str, Any]) -> str:
    """Online DPO: one row per round (summary.json's ``rounds``), its pairs kept and dropped and the mean scores."""
    rounds = summary.get("rounds")
    if not rounds:
        return ""
    cols = ["round", "step", "prompts", "kept", "tie", "inconsistent", "intransitive", "sample_score",
            "chosen_score", "rejected_score"]
    body = [[f'<td class="num">{fmt(r.get(c))}</td>' for c in cols] + [f"<td>{escape(str(r.get('file', '')))}</td>"]
            for r in rounds]
    return "<h2>rounds: pairs kept and dropped</h2>\n" + table([*cols, "pairs file"], body)


def run_report_html(run_dir: Path) -> str:
    """The report page of one run folder (metrics.jsonl, summary.json, config.yaml, samples.jsonl if present)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text() if config_path.exists() else ""
    method = _method(config_text)
    name = run_dir.resolve().name
    summary = read_json(run_dir / "summary.json") or {}
    summary = summary if isinstance(summary, dict) else {}
    facts = [(k, seconds(summary[k]) if k == "seconds" else fmt(summary[k]))
             for k in ("steps", "seconds", "trainable", "total_params", "final_loss", "output")
             if summary.get(k) is not None]
    body = [f"<h1>{escape(name)} \u00b7 {escape(method.upper())}</h1>",
            f'<p class="sub">{escape(str(run_dir))}</p>']
    if facts:
        body.append(table(["summary", ""], [[escape(k), f'<td class="num">{v}</td>'] for k, v in facts]))
    if summary.get("data"):
        body.append('<pre class="wrap">' + escape("\n".join(map(str, summary["data"]))) + "</pre>")
    body += ["<h2>held-out evaluation, before and after</h2>", _before_after(summary), _rounds(summary),
             "<h2>curves</h2>", curves_html(run_dir, name), _samples(run_dir)]
    if config_text:
        body += ["<h2>config.yaml</h2>", f"<pre>{escape(config_text)}</pre>"]
    return page(f"{name} \u00b7 {method}", body)


def write_run_report(run_dir: Path) -> Path:
    path = Path(run_dir) / "report.html"
    atomic_write_text(path, run_report_html(Path(run_dir)))
    return path

