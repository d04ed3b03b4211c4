"""``posttrain run WORKFLOW.yaml``: eval set -> baseline -> train stages and gates -> export, then report.html.

Every stage's result is stored under the workflow folder with the hash of everything it was computed from (its
resolved config, the content of its data files, the key of the stage it starts from). A re-run recomputes only
the stages whose key changed and those after them that depend on them; a train stage that stopped half way
resumes from its last complete checkpoint. A gate compares a candidate's eval results with the baseline's (or an
earlier stage's) and stops the workflow with exit code 1 and a table when a rule fails.
"""

from __future__ import annotations

import json
import shutil
import string
import time
from pathlib import Path
from typing import Any

from posttrain.config import (
    StageSpec,
    SuitesConfig,
    SuiteSpec,
    WorkflowConfig,
    dump_config,
    load_config,
    load_suites,
    load_workflow,
)
from posttrain.curate import contamination
from posttrain.data import holdout_split, read_rows
from posttrain.engine import console
from posttrain.engine.checkpoint import list_checkpoints
from posttrain.engine.trackers import check_installed
from posttrain.errors import ConfigError
from posttrain.eval.gate import Rule, check_gate, gate_table
from posttrain.eval.suites import SUITE_OPTIONS, run_suite
from posttrain.io import atomic_write_text, content_key, file_hash, read_json
from posttrain.judge import ModelJudge
from posttrain.recipes import RECIPES
from posttrain.report import write_workflow_report
from posttrain.runs import data_files_of, load_for_inference, trained_model_of
from posttrain.ship import export_run


class GateBlocked(RuntimeError):
    """A gate's rule failed: the stages after it do not run."""


def _substitute(value: Any, names: dict[str, str]) -> Any:
    """${eval_set}, ${train_set} and ${workflow_dir} inside strings of a config tree."""
    if isinstance(value, str):
        return string.Template(value).safe_substitute(names)
    if isinstance(value, list):
        return [_substitute(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, names) for k, v in value.items()}
    return value


def check_suites(cfg: WorkflowConfig | SuitesConfig) -> None:
    """Unknown suite options are errors before anything runs, not after an hour of training."""

    for name, spec in cfg.evals.items():
        unknown = sorted(set(spec.options) - SUITE_OPTIONS[spec.kind])
        if unknown:
            raise ConfigError(f"evals.{name}: {spec.kind} suites have no option {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(SUITE_OPTIONS[spec.kind])) or 'none'}")


def metric_values(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, bool]]:
    """One model's suite results as ``suite/metric`` -> value, and -> whether higher is better."""
    values, better = {}, {}
    for suite, res in results.items():
        for metric, v in res["metrics"].items():
            values[f"{suite}/{metric}"] = v
            better[f"{suite}/{metric}"] = res["higher_is_better"].get(metric, True)
    return values, better


def eval_table(by_label: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The evals of several models (label -> suite results) as the table report.html and workflow.json hold."""
    rows: dict[str, dict[str, float]] = {}
    better: dict[str, bool] = {}
    for label, results in by_label.items():
        values, hib = metric_values(results)
        for metric, v in values.items():
            rows.setdefault(metric, {})[label] = v
        better.update(hib)
    return {"columns": list(by_label), "rows": rows, "higher_is_better": better}


def print_eval_table(name: str, table: dict[str, Any]) -> None:
    from rich.table import Table

    if not table["columns"]:
        return
    t = Table(title=f"{name}: evals")
    t.add_column("metric")
    for c in table["columns"]:
        t.add_column(c, justify="right")
    for metric, cells in table["rows"].items():
        t.add_row(metric, *(f"{cells[c]:.3f}" if c in cells else "—" for c in table["columns"]))
    console.print(t)


class Workflow:
    def __init__(self, cfg: WorkflowConfig, source: str = "") -> None:
        check_suites(cfg)
        self.cfg, self.source = cfg, source
        self.root = Path(cfg.output_dir)
        self.names: dict[str, str] = {"workflow_dir": str(self.root)}
        self.keys: dict[str, str] = {}              # stage -> content key ("baseline" included)
        self.evals: dict[str, dict[str, Any]] = {}  # model label -> suite -> cached result
        self.stage_rows: list[dict[str, Any]] = []  # for the report: name, status, seconds, detail
        self.gates: list[dict[str, Any]] = []
        self.runs: dict[str, Path] = {}
        self._judges: dict[str | None, Any] = {}      # judge model -> ModelJudge, loaded once each
        self._jobs: dict[str, Any] = {}                 # train stage -> its resolved job config
        self.contamination = "not checked"              # for workflow.json (and so the model card)

    # -- the held-out set ------------------------------------------------------------------------------------
    def eval_set(self) -> None:
        spec, t0 = self.cfg.eval_set, time.perf_counter()
        if spec.file:
            self.names["eval_set"] = spec.file
            detail = f"{spec.file}, {len(read_rows(spec.file))} rows"
        else:
            data = self.root / "data"
            train_path, eval_path = data / "train.jsonl", data / "eval.jsonl"
            key = content_key(file_hash(spec.split), spec.fraction, spec.seed)
            if (read_json(data / "split.json") or {}).get("key") != key:
                rows = read_rows(spec.split)
                keep, hold = holdout_split(len(rows), spec.fraction, spec.seed)
                data.mkdir(parents=True, exist_ok=True)
                for path, idx in ((train_path, keep), (eval_path, hold)):
                    atomic_write_text(path, "".join(json.dumps(rows[i][1]) + "\n" for i in idx))
                atomic_write_text(data / "split.json", json.dumps({"key": key, "source": spec.split,
                                                                   "train": len(keep), "eval": len(hold)}))
            split = read_json(data / "split.json")
            self.names.update(train_set=str(train_path), eval_set=str(eval_path))
            detail = f"{split['eval']} of {split['eval'] + split['train']} rows of {spec.split} held out"
        digest = file_hash(self.names["eval_set"])
        detail += f"; sha256 {digest}"
        if spec.check_contamination and "train_set" in self.names:

            report = contamination(self.names["train_set"], self.names["eval_set"])
            leaks = [r.row for r in report.rows if r.contaminated]
            if leaks:
                self.contamination = f"held-out rows {leaks[:10]} found in {self.names['train_set']}"
                raise GateBlocked(f"eval set: held-out rows {leaks[:10]} share >= {report.threshold:.0%} of their "
                                  f"{report.n}-grams with {self.names['train_set']} (run `posttrain data "
                                  "contamination` for the table)")
            detail += "; no train/eval contamination"
            self.contamination = f"none: no held-out row shares >= {report.threshold:.0%} of its {report.n}-grams " \
                                 f"with {self.names['train_set']}"
        self.keys["eval_set"] = digest
        self._row("eval_set", "ran", time.perf_counter() - t0, detail)

    # -- evaluation ------------------------------------------------------------------------------------------
    def _suite(self, name: str) -> SuiteSpec:
        return SuiteSpec.model_validate(_substitute(self.cfg.evals[name].model_dump(), self.names))

    def _judge_for(self, spec: SuiteSpec):
        name = spec.judge_model or self.cfg.model
        if name not in self._judges:

            loaded = load_for_inference(name, None)
            self._judges[name] = ModelJudge(loaded.model, loaded.tokenizer, name=name or "embedded")
        return self._judges[name]

    def evaluate(self, label: str, model_key: str, load, system_prompt: str | None) -> bool:
        """Run every suite on one model (loaded only if some suite's cached result is stale); False when every
        result came from the cache."""

        path = self.root / "evals" / f"{label}.json"
        cache = read_json(path) or {}
        results, loaded = {}, None
        for name in self.cfg.evals:
            spec = self._suite(name)
            reference = None if label == "baseline" or spec.kind != "judge" else \
                self.evals["baseline"][name].get("outputs")
            key = content_key(model_key, spec.model_dump(), file_hash(spec.data), system_prompt,
                              self.keys.get("baseline") if spec.kind == "judge" else None)
            if cache.get(name, {}).get("key") == key:
                results[name] = cache[name]
                continue
            if loaded is None:
                loaded = load()
            judge = self._judge_for(spec) if spec.kind == "judge" else None
            r = run_suite(spec.kind, loaded.model, loaded.tokenizer, spec.data, options=spec.options,
                          limit=spec.limit, system_prompt=system_prompt, reference_outputs=reference, judge=judge)
            results[name] = {"key": key, "metrics": r.metrics, "higher_is_better": r.higher_is_better,
                             "outputs": r.outputs, "details": r.details[:50]}
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({**cache, **results}, indent=1))
        self.evals[label] = results
        return loaded is not None

    def metrics_of(self, label: str) -> tuple[dict[str, float], dict[str, bool]]:
        return metric_values(self.evals.get(label, {}))

    # -- stages ----------------------------------------------------------------------------------------------
    def baseline(self) -> None:
        t0 = time.perf_counter()
        prompt = self.cfg.baseline.system_prompt
        self.keys["baseline"] = content_key(self.cfg.model, prompt)
        ran = self.evaluate("baseline", self.keys["baseline"], lambda: load_for_inference(self.cfg.model, None), prompt)
        self._row("baseline", "ran" if ran else "cached", time.perf_counter() - t0,
                  f"{self.cfg.model or 'embedded SmolLM2-135M-Instruct'}"
                  + (f" + system prompt {prompt!r}" if prompt else " (no system prompt)"))

    def job_of(self, st: StageSpec) -> Any:
        if isinstance(st.config, str):
            import yaml

            path = _substitute(st.config, self.names)
            try:
                tree = yaml.safe_load(Path(path).read_text()) or {}
            except OSError as exc:
                raise ConfigError(f"stage {st.name}: cannot read {path}: {exc.strerror}") from None
        else:
            tree = dict(st.config or {})
        forced = [f"output_dir={self.root / st.name}"]
        if self.cfg.model is not None:
            forced.append(f"model.name={self.cfg.model}")
        if st.init_from:
            forced.append(f"model.init_adapter={self.root / st.init_from}")
        return load_config(None, _substitute(st.overrides, self.names) + forced, method=st.train,
                           base=_substitute(tree, self.names))

    def check_trackers(self) -> None:
        """A tracker a stage names whose package is missing stops the workflow before the baseline loads a model;
        a stage whose config does not load yet is left to report that itself when it runs."""
        for st in (s for s in self.cfg.stages if s.train):
            try:
                job = self.job_of(st)
            except ConfigError:
                continue
            check_installed(job.train.report_to)

    def train(self, st: StageSpec) -> str:
        job = self._jobs[st.name] = self.job_of(st)
        # the card section names what the model is for; it changes no weight, so it is not part of the key
        settings = {k: v for k, v in job.model_dump(mode="json").items() if k not in ("output_dir", "card")}
        key = content_key(st.train, settings, [file_hash(p) for p in data_files_of(job.model_dump())],
                          self.keys.get(st.init_from) if st.init_from else None)
        folder = self.root / st.name
        state = read_json(folder / "stage.json") or {}
        self.keys[st.name], self.runs[st.name] = key, folder
        if state.get("key") == key and state.get("status") == "done":
            return "cached"
        resume = state.get("key") == key and bool(list_checkpoints(folder / "checkpoints"))
        if state and state.get("key") != key and folder.exists():
            shutil.rmtree(folder)  # a cache entry of other inputs: its checkpoints must not be resumed
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "stage.json", json.dumps({"key": key, "status": "running"}))
        RECIPES[st.train].run(job, resume=resume)
        atomic_write_text(folder / "stage.json", json.dumps({"key": key, "status": "done"}))
        return "resumed" if resume else "ran"

    def evaluate_stage(self, st: StageSpec) -> None:
        job, folder = self._jobs[st.name], self.root / st.name
        model_name, adapter = trained_model_of(folder, job.finetune, None)
        self.evaluate(st.name, self.keys[st.name], lambda: load_for_inference(model_name, adapter), None)

    def gate(self, st: StageSpec) -> bool:
        g = st.gate
        base, better = self.metrics_of(g.baseline)
        cand, cand_better = self.metrics_of(g.candidate)
        rules = [Rule(**r.model_dump()) for r in g.rules]
        verdict = check_gate(st.name, rules, base, cand, {**better, **cand_better}, baseline_name=g.baseline,
                             candidate_name=g.candidate)
        self.gates.append(verdict)
        console.print(gate_table(verdict))
        return bool(verdict["passed"])

    def export(self, st: StageSpec) -> str:
        out = self.root / st.name
        key = content_key("export", self.keys[st.export])
        if (read_json(out / "export_report.json") or {}).get("workflow_key") == key:
            return "cached"
        report = export_run(str(self.root / st.export), str(out), workflow=self.summary())
        atomic_write_text(out / "export_report.json", json.dumps({**report, "workflow_key": key}, indent=2))
        return "ran"

    # -- driving ---------------------------------------------------------------------------------------------
    def _row(self, name: str, status: str, seconds: float | None, detail: str) -> None:
        self.stage_rows.append({"name": name, "status": status, "seconds": seconds, "detail": detail})
        took = f" in {seconds:.0f} s" if seconds is not None else ""
        console.print(f"[bold]workflow[/] {name}: {status}{took} — {detail}", soft_wrap=True)

    def run(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        blocked_by = None
        try:
            self.eval_set()
            self.check_trackers()
            self.baseline()
            for st in self.cfg.stages:
                if blocked_by:
                    self._row(st.name, "blocked", None, f"not run: {blocked_by} blocked")
                    continue
                t0 = time.perf_counter()
                try:
                    if st.train:
                        status = self.train(st)
                        if st.evaluate and RECIPES[st.train].generates:
                            self.evaluate_stage(st)
                        detail = f"{st.train} -> {self.root / st.name}"
                    elif st.gate:
                        status = "passed" if self.gate(st) else "blocked"
                        detail = f"{st.gate.candidate} vs {st.gate.baseline}, {len(st.gate.rules)} rules"
                        blocked_by = st.name if status == "blocked" else None
                    else:
                        status, detail = self.export(st), f"{st.export} -> {self.root / st.name}"
                except Exception as exc:
                    self._row(st.name, "failed", time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
                    raise
                self._row(st.name, status, time.perf_counter() - t0, detail)
        except GateBlocked as exc:
            blocked_by = "eval_set"
            self._row("eval_set", "blocked", None, str(exc))
        finally:
            self.write_outputs()
        if blocked_by:
            console.print(f"[bold red]workflow blocked at {blocked_by}[/]; report: {self.root / 'report.html'}")
            return 1
        console.print(f"[bold green]workflow passed[/]; report: {self.root / 'report.html'}")
        return 0

    def eval_table(self) -> dict[str, Any]:
        return eval_table({label: self.evals[label] for label in ["baseline", *(s.name for s in self.cfg.stages)]
                           if label in self.evals})

    def summary(self) -> dict[str, Any]:
        """workflow.json: what ran, the evals, the gate verdicts; an export stage's model card reads it too."""
        return {"name": self.cfg.name, "eval_set_sha256": self.keys.get("eval_set"),
                "eval_set": self.names.get("eval_set"), "contamination": self.contamination,
                "suites": {n: {"kind": spec.kind, "data": _substitute(spec.data, self.names)}
                           for n, spec in self.cfg.evals.items()},
                "stages": self.stage_rows, "evals": self.eval_table(), "gates": self.gates, "keys": self.keys}

    def write_outputs(self) -> None:
        summary = self.summary()
        atomic_write_text(self.root / "workflow.json", json.dumps(summary, indent=2))
        print_eval_table(self.cfg.name, summary["evals"])
        write_workflow_report(self.root / "report.html", title=self.cfg.name, stages=self.stage_rows,
                              evals=summary["evals"], gates=self.gates, runs=self.runs,
                              config_text=self.source or dump_config(self.cfg))


def run_workflow(path: str, overrides: list[str] | None = None) -> int:
    """Load, validate and run a workflow file; 0 when every gate passed, 1 when one blocked."""

    cfg = load_workflow(path, overrides)
    return Workflow(cfg, Path(path).read_text()).run()


def evaluate_target(suites_path: str, target: str, out: str | Path | None = None, *, use_base: bool = False,
                    overrides: list[str] | None = None) -> dict[str, Any]:
    """``posttrain eval TARGET --suites FILE``: every suite of FILE on one model, the trained model of a run folder
    (its base alone with ``use_base``) or a model name, folder or GGUF file ('embedded': the embedded model).
    Results go to OUT/evals.json and OUT/report.html (default: RUN/evals/NAME, else runs/evals/NAME)."""
    cfg = load_suites(suites_path, overrides)
    check_suites(cfg)
    judged = [name for name, spec in cfg.evals.items() if spec.kind == "judge"]
    if judged:
        raise ConfigError(f"{suites_path}: judge suites ({', '.join(judged)}) compare a model's answers with a "
                          "baseline's: run them in a workflow (posttrain run)")
    run_dir = Path(target) if (Path(target) / "config.yaml").is_file() else None
    if run_dir is not None:
        job = load_config(run_dir / "config.yaml")
        model_name, adapter = trained_model_of(run_dir, job.finetune, job.model.name, use_base=use_base)
        label = run_dir.name + (" (base)" if use_base else "")
    else:
        model_name, adapter, label = (None if target == "embedded" else target), None, target
    root = Path(out) if out else (run_dir or Path("runs")) / "evals" / cfg.name
    t0 = time.perf_counter()
    loaded = load_for_inference(model_name, adapter)
    results = {}
    root.mkdir(parents=True, exist_ok=True)
    for name, spec in cfg.evals.items():
        r = run_suite(spec.kind, loaded.model, loaded.tokenizer, spec.data, options=spec.options, limit=spec.limit,
                      system_prompt=cfg.system_prompt)
        results[name] = {"metrics": r.metrics, "higher_is_better": r.higher_is_better, "outputs": r.outputs,
                         "details": r.details[:50]}
        # written after every suite, so a long suite file that fails late keeps what it already measured
        atomic_write_text(root / "evals.json", json.dumps({"target": label, "suites": results}, indent=1))
    table = eval_table({label: results})
    print_eval_table(cfg.name, table)
    stage = {"name": label, "status": "ran", "seconds": round(time.perf_counter() - t0, 1),
             "detail": f"{model_name or 'embedded SmolLM2-135M-Instruct'}" + (f" + {adapter}" if adapter else "")}
    write_workflow_report(root / "report.html", title=cfg.name, stages=[stage], evals=table, gates=[], runs={},
                          config_text=Path(suites_path).read_text())
    return {"target": label, "out": str(root), "seconds": stage["seconds"],
            "metrics": {name: res["metrics"] for name, res in results.items()}}
