"""What ``--resume`` may change: the checkpoint's config against the new one, before anything is loaded or written.

A resumed run is worth something only if it is the run that was started, continued. So every config key counts as
changing the result unless one of the small tables below allows it (what is logged, evaluated or kept; the length,
on request; the split of a step's batch); a key added to the config later is refused on resume until someone argues
it onto a table, never silently let through. Layer 7 (it reads configs); the loop's side is engine/resume.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from posttrain.config import CONFIGS, dump_config
from posttrain.engine.checkpoint import list_checkpoints, trainer_state
from posttrain.engine.distributed import world
from posttrain.engine.logging import console
from posttrain.engine.resume import LEGACY_SCHEDULE, Resume, RunStart
from posttrain.errors import ConfigError
from posttrain.models.loading import choose_device
from posttrain.models.numerics import choose_numerics

# The keys a resume may change, each with the reason it cannot change what the run computes.
BOOKKEEPING: dict[str, str] = {
    "output_dir": "where the run folder is now (it may have been moved; the checkpoint inside it is what is read)",
    "train.log_every": "how often a step record is written",
    "train.eval_every": "how often the held-out set is scored (evaluation reads the model, never updates it)",
    "train.save_every": "how often a checkpoint is written",
    "train.save_total_limit": "how many checkpoints are kept",
    "eval_samples": "how many held-out generations samples.jsonl gets at the end",
    "train.max_minutes": "where a wall-clock budget stops the run, never what a step computes (the lr schedule "
                         "follows train.max_steps)",
    "train.report_to": "where the records are sent besides metrics.jsonl (a resume starts a new tracker run)",
    "train.tracker_project": "the trackers' project the records are sent to",
    "train.run_name": "the run's name in the trackers",
}
# Allowed with --extend-steps only: the rest of the lr schedule is then re-laid over the new length (Schedule.relaid).
STEP_KEYS = frozenset({"train.max_steps"})
# Allowed while the global batch (micro_batch_size x grad_accum x processes) stays the same: the loss is normalised
# over the whole step, so how a step's rows are split does not change it, and a run may resume under another number
# of processes by moving the difference into accumulation.
SAME_GLOBAL_BATCH = frozenset({"train.grad_accum"})
# Keys naming a file the run reads. The bytes are compared too: an edited file under its old name is another run.
INPUT_FILES = ("data.train", "data.eval", "data.mix.path", "data.replay.prompts", "data.chat_template")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def input_hashes(cfg: BaseModel) -> dict[str, str]:
    """sha256 of each file the config names (a chat template given as text, not a file, has none)."""
    tree = cfg.model_dump(mode="json")
    return {key: file_sha256(value) for key in INPUT_FILES
            if isinstance(value := _get(tree, key), str) and Path(value).is_file()}


# model.dtype=auto resolves by the machine's CPU (models/numerics.py): a run started in bf16_mixed on a CPU with
# native bf16 and resumed in fp32 on one without is not the run that was started, though its config is the same.
NUMERICS_KEY = "numerics"


def resolved_numerics(cfg: BaseModel) -> str | None:
    model = getattr(cfg, "model", None)
    return choose_numerics(model.dtype, choose_device(model.device)).name if model is not None else None


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``dotted.key -> (old, new)`` for every leaf that differs; a list is one value."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = (a, b)
    return out


def recorded_config(checkpoint: Path) -> tuple[dict[str, Any], Path]:
    """The config a checkpoint was trained with (its own copy, else the run's config.yaml for checkpoints written
    before they carried one), with this version's defaults filled in, and where it was read."""
    for path in (checkpoint / "config.yaml", checkpoint.parent.parent / "config.yaml"):
        if path.is_file():
            try:
                tree = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"--resume: {path} is not valid YAML: {exc}") from None
            schema = CONFIGS.get(tree.get("method")) if isinstance(tree, dict) else None
            try:  # defaults of keys added since: the same config written by an older version compares equal
                return (schema.model_validate(tree).model_dump(mode="json") if schema else tree), path
            except ValidationError:  # a key renamed or removed since: compare as written, it shows up as a change
                return tree, path
    raise ConfigError(f"--resume: neither {checkpoint} nor its run folder holds a config.yaml, so there is nothing "
                      "to check the new config against; start a new run (another output_dir)")


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 160 else f"{text[:70]}...{text[-70:]}"  # paths differ at their ends


def _content_changes(old: dict[str, str] | None, new: dict[str, str],
                     changes: dict[str, tuple[Any, Any]]) -> dict[str, tuple[str, str]]:
    if old is None:
        console.print("[yellow]--resume: this checkpoint predates recorded input hashes; the data files' names are "
                      "checked, their contents are not[/]")
        return {}

    def show(digest: str | None) -> str:
        return f"sha256 {digest[:12]}" if digest else "no file"
    return {f"{key} (file content)": (show(old.get(key)), show(new.get(key))) for key in INPUT_FILES
            if old.get(key) != new.get(key) and key not in changes}


def _global_batch(tree: dict[str, Any], processes: int) -> tuple[str, int | None]:
    micro, accum = _get(tree, "train.micro_batch_size"), _get(tree, "train.grad_accum")
    if not (isinstance(micro, int) and isinstance(accum, int)):
        return "unknown", None
    return f"{micro} x {accum} x {processes} = {micro * accum * processes}", micro * accum * processes


def _check_length(checkpoint: Path, state: dict[str, Any], max_steps: int | None) -> None:
    if max_steps is None:
        raise ConfigError("--extend-steps: set train.max_steps, the run's new length (it is null now)")
    if max_steps <= state["step"]:
        raise ConfigError(f"--extend-steps: {checkpoint.name} is at step {state['step']}; train.max_steps="
                          f"{max_steps} leaves no step to train")
    if "schedule" not in state:
        raise ConfigError(f"--extend-steps: {checkpoint} {LEGACY_SCHEDULE}")


def _allowed(key: str, extend: bool, same_batch: bool) -> bool:
    return key in BOOKKEEPING or (extend and key in STEP_KEYS) or (same_batch and key in SAME_GLOBAL_BATCH)


def _refusal(checkpoint: Path, source: Path, refused: dict[str, tuple[str, str]]) -> ConfigError:
    lines = [(f"--resume refused: {len(refused)} key(s) differ from the config {checkpoint.name} was trained "
              f"with ({source}), old -> new:")]
    lines += [f"  {k}: {a} -> {b}" for k, (a, b) in refused.items()]
    lines.append("They change what the run computes, so the result would be neither the old run nor a new one. "
                 "Put the old values back, or start a new run in another output_dir.")
    if refused.keys() & STEP_KEYS:
        lines.append("train.max_steps may change with --extend-steps: the steps taken keep their lr, the rest of "
                     "the decay is re-laid from the current lr down to the floor over the new length.")
    lines.append(f"A resume may change: {', '.join(BOOKKEEPING)}; {', '.join(SAME_GLOBAL_BATCH)} while the "
                 "global batch stays the same.")
    return ConfigError("\n".join(lines))


def check_resume(cfg: BaseModel, resume: bool | Resume = False) -> RunStart:
    """The start of a run of ``cfg``. With ``resume``: the last complete checkpoint, after refusing (a ConfigError
    listing ``key: old -> new``) any difference from the config it was trained with that the tables above do not
    allow, and any edited input file. It only reads, so a refused resume has loaded and written nothing."""
    start = RunStart(config_text=dump_config(cfg), inputs=input_hashes(cfg))
    if (numerics := resolved_numerics(cfg)) is not None:
        start.inputs[NUMERICS_KEY] = numerics
    if not resume:
        return start
    extend = isinstance(resume, Resume) and resume.extend_steps
    root = Path(cfg.output_dir) / "checkpoints"
    found = list_checkpoints(root)
    if not found:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {root}")
    checkpoint, state = found[-1], trainer_state(found[-1])
    old, source = recorded_config(checkpoint)
    new = cfg.model_dump(mode="json")
    changes = config_changes(old, new)
    # A checkpoint from before world_size was recorded: its global batch is unknown, so its split may not move.
    ran_on, processes = state.get("world_size"), world().size
    (old_text, old_batch), (new_text, new_batch) = _global_batch(old, ran_on or 1), _global_batch(new, processes)
    same_batch = ran_on is not None and old_batch is not None and old_batch == new_batch
    refused = {k: (_show(a), _show(b)) for k, (a, b) in changes.items() if not _allowed(k, extend, same_batch)}
    if ran_on is not None and not same_batch:
        refused["global batch (micro_batch_size x grad_accum x processes)"] = (old_text, new_text)
    if ran_on is not None and ran_on != processes:
        changes["processes"] = (ran_on, processes)  # not a config key, but part of the run's history
    refused.update(_content_changes(state.get("inputs"), start.inputs, changes))
    was = (state.get("inputs") or {}).get(NUMERICS_KEY)
    if was is not None and was != start.inputs.get(NUMERICS_KEY) and "model.dtype" not in changes:
        refused[f"{NUMERICS_KEY} (model.dtype {_get(new, 'model.dtype')} on this machine)"] = (
            was, start.inputs.get(NUMERICS_KEY))
    if refused:
        raise _refusal(checkpoint, source, refused)
    if extend and changes.keys() & STEP_KEYS:
        _check_length(checkpoint, state, getattr(getattr(cfg, "train", None), "max_steps", None))
    return RunStart(start.config_text, start.inputs, checkpoint, changes, extend)
