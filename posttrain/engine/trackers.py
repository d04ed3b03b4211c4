"""Experiment trackers: where a run's records go besides metrics.jsonl (``train.report_to``).

One table, ``TRACKERS``: a class per tracker, each with the same three calls. ``start`` gets the run's config (the
resolved config.yaml as a dict) and the run folder, ``log`` gets every record metrics.jsonl gets (its numbers: a
record's nested entries, such as a resume's list of changes, stay in metrics.jsonl), and ``finish`` gets the final
evals (the first and last eval records, as summary.json's eval_before and eval_after) and whether the run failed.
A tracker's package is imported only when it starts; ``check_installed`` finds a missing one before a model loads.

Local stores, for runs without a server: MLflow writes a file store under the run folder (``mlruns/``) unless
MLFLOW_TRACKING_URI names one; W&B writes under the run folder (``wandb/``; WANDB_MODE=offline keeps it there);
Trackio writes its SQLite store under TRACKIO_DIR (by default ~/.cache/huggingface/trackio), where ``trackio show``
reads it. Layer 3: imports errors only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from posttrain.errors import ConfigError


class Tracker(Protocol):
    """What the log asks of a tracker. ``package``: the pip package that provides ``module``."""

    package: str
    module: str

    def start(self, config: dict[str, Any], run_dir: Path) -> None: ...

    def log(self, record: dict[str, float], step: int) -> None: ...

    def finish(self, final: dict[str, Any], failed: bool) -> None: ...


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of a record, without its step: what every tracker plots."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def flat_final(final: dict[str, Any]) -> dict[str, float]:
    """The final evals as one level of names: ``eval_after/eval/loss``, ``final_loss``, ..."""
    out: dict[str, float] = {}
    for key, value in final.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in numbers(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class TensorBoard:
    package, module = "tensorboard", "tensorboard"

    def __init__(self, project: str, name: str):
        self.writer: Any = None

    def start(self, config: dict[str, Any], run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step 0: events an earlier run left in this folder are hidden, as metrics.jsonl is rewritten; a
        # resume's kept records come back through log().
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=0)
        if config:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, record: dict[str, float], step: int) -> None:
        for key, value in record.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, final: dict[str, Any], failed: bool) -> None:
        self.writer.add_text("final_evals", "```\n" + json.dumps(final, indent=2) + "\n```", final.get("steps", 0))
        self.writer.close()


class MLflow:
    package, module = "mlflow-skinny", "mlflow"

    def __init__(self, project: str, name: str):
        self.project, self.name = project, name
        self.client: Any = None
        self.run_id = ""

    def start(self, config: dict[str, Any], run_dir: Path) -> None:
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        if mlflow.tracking.is_tracking_uri_set():
            uri = mlflow.get_tracking_uri()
        else:
            # mlflow-skinny has no SQL store (no sqlalchemy); its file store is frozen ("maintenance mode") but
            # complete, and a folder beside the run's other files is what a run without a server wants.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(self.project)
        experiment = found.experiment_id if found else self.client.create_experiment(self.project)
        self.run_id = self.client.create_run(experiment, run_name=self.name,
                                             tags={"posttrain.run_dir": str(run_dir.resolve())}).info.run_id
        # Every value as a searchable param; one too long for a param (an inline chat template) is in the
        # config.yaml artifact beside them, as all of them are.
        params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v))
                  for k, v in flat_config(config).items()]
        params = [p for p in params if len(p.value) <= MAX_PARAM_VAL_LENGTH]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def log(self, record: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in record.items()])

    def finish(self, final: dict[str, Any], failed: bool) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(final.get("steps") or 0)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in flat_final(final).items()])
        self.client.log_dict(self.run_id, final, "final_evals.json")
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandB:
    package, module = "wandb", "wandb"

    def __init__(self, project: str, name: str):
        self.project, self.name = project, name
        self.run: Any = None

    def start(self, config: dict[str, Any], run_dir: Path) -> None:
        import wandb

        # W&B's own dir is the working directory; the run folder keeps a run's files together (WANDB_DIR wins).
        self.run = wandb.init(project=self.project, name=self.name, config=config,
                              dir=os.environ.get("WANDB_DIR") or str(run_dir))

    def log(self, record: dict[str, float], step: int) -> None:
        self.run.log(record, step=step)

    def finish(self, final: dict[str, Any], failed: bool) -> None:
        self.run.summary.update(flat_final(final))
        self.run.finish(exit_code=1 if failed else 0)


class Trackio:
    package, module = "trackio", "trackio"

    def __init__(self, project: str, name: str):
        self.project, self.name = project, name
        self.run: Any = None
        self.last_step = 0

    def start(self, config: dict[str, Any], run_dir: Path) -> None:
        import trackio

        self.run = trackio.init(project=self.project, name=self.name, config=config, embed=False)

    def log(self, record: dict[str, float], step: int) -> None:
        self.run.log(record, step=step)
        self.last_step = step

    def finish(self, final: dict[str, Any], failed: bool) -> None:
        # Trackio keeps no run summary: the final evals are logged once more, under their own names, at the end.
        self.run.log(flat_final(final), step=max(self.last_step, int(final.get("steps") or 0)))
        self.run.finish()


TRACKERS: dict[str, type] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB, "trackio": Trackio}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def tensorboard_works() -> bool:
    """Whether torch's TensorBoard writer imports: what decided TensorBoard logging before report_to existed (torch
    refuses a tensorboard older than 1.15 with an ImportError, so an installed package is not enough)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(report_to: str | list[str] | tuple[str, ...]) -> list[str]:
    """The trackers a run logs to. ``auto`` is what runs did before the key existed: TensorBoard when torch's writer
    imports, else metrics.jsonl alone; a list names each one, installed or not (``check_installed``)."""
    if report_to == "auto":
        return ["tensorboard"] if tensorboard_works() else []
    names = list(dict.fromkeys(report_to))
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ConfigError(f"train.report_to: unknown tracker {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")
    return names


def check_installed(report_to: str | list[str] | tuple[str, ...]) -> list[str]:
    """The trackers of ``report_to``; a ConfigError naming the pip package when one is missing. Only looks the
    packages up (no import), so it costs nothing before the model loads."""
    names = resolve(report_to)
    missing = [TRACKERS[n] for n in names if not installed(TRACKERS[n].module)]
    if missing:
        need = ", ".join(f"{c.module} (pip install {c.package})" for c in missing)
        raise ConfigError(f"train.report_to needs {need}; or pip install 'posttrain[trackers]' for all of them, "
                          f"or take the tracker out of train.report_to")
    return names


def open_trackers(report_to: str | list[str] | tuple[str, ...], project: str, name: str) -> list[Tracker]:
    """One unstarted tracker per name of ``report_to``."""
    return [TRACKERS[n](project, name) for n in check_installed(report_to)]
