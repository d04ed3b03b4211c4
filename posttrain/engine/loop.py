"""The one training loop every method uses.

Per optimizer step: fetch this step's micro-batches (deterministic by step, so resume is exact), count the
loss units (trained tokens) over all of them and all ranks, backpropagate each micro-batch's summed loss
divided by that total, clip, step, log. The loss is therefore the same token mean whatever the split into
micro-batches, accumulation steps or packed rows.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from posttrain.engine.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, trainer_state
from posttrain.engine.distributed import all_reduce_grads, barrier, clip_grad_norm, sum_over_ranks, unsharded, world
from posttrain.engine.logging import MetricsLog, console, format_line
from posttrain.engine.resume import RunStart, resumed_schedule
from posttrain.engine.schedule import Schedule
from posttrain.engine.trackers import open_trackers
from posttrain.models.forward import Batch

# (summed loss, metrics). A metric is a float, averaged over the step's micro-batches and the ranks, or a (sum,
# count) pair, summed over them and divided once: the mean over the units that have it (KTO's reward of one class,
# which a micro-batch may lack); a step where no unit has it logs no value for it.
LossPart = tuple[torch.Tensor, dict[str, float | tuple[float, float]]]


class Method(Protocol):
    """What the loop asks of a training method: its name, a batch's loss units, and a batch's summed loss.

    ``loss_parts``: None (every method but PPO) means the batch's loss is one part, ``loss_sum``. A method with
    several networks (PPO's actor and critic) sets it to a function yielding the loss in parts instead, each
    backpropagated before the next is built, so only one part's activations are alive at a time. A method object
    without the attribute counts as None."""

    name: str
    loss_parts: Callable[[torch.nn.Module, Batch], Iterable[LossPart]] | None

    def count(self, batch: Batch) -> int: ...

    def loss_sum(self, model: torch.nn.Module, batch: Batch) -> LossPart: ...


class StepBatches(Protocol):
    def step(self, step: int) -> list[Batch]: ...


@dataclass
class LoopOptions:
    """The loop's settings. The ones a config sets have no defaults here: a run takes them from
    ``posttrain.config.TrainConfig``, where each default is declared once (``recipes._common.loop_options``)."""
    total_steps: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    adam_betas: tuple[float, float]
    max_grad_norm: float | None
    log_every: int
    eval_every: int | None
    save_every: int | None
    save_total_limit: int
    optimizer: str
    max_minutes: float | None
    # Where the records go besides metrics.jsonl (engine.trackers.TRACKERS), under which project and run name
    # (None: the run folder's name). Rank 0 alone logs, as it alone writes metrics.jsonl.
    report_to: str | list[str]
    tracker_project: str
    run_name: str | None
    # bf16_mixed numerics: forwards (rollouts and evals included) under torch.autocast in this dtype, while weights,
    # gradients, optimizer state and the loss sum stay fp32. Backward follows the dtypes the forward chose.
    autocast: torch.dtype | None = None


def _bnb_optimizer(name: str) -> Callable[..., torch.optim.Optimizer]:
    def build(params, **kw) -> torch.optim.Optimizer:
        import bitsandbytes as bnb

        return getattr(bnb.optim, name)(params, **kw)
    return build


# 8-bit moments take 2 bytes per trainable parameter instead of 8; paged state moves to CPU under GPU memory pressure.
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adamw_8bit": _bnb_optimizer("AdamW8bit"),
    "paged_adamw_8bit": _bnb_optimizer("PagedAdamW8bit"),
}


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees gigabytes of activations. By default glibc serves each large block
    with a fresh mmap and unmaps it when freed, so every step first-touches all of it again: ~700k page faults
    per SFT step of the embedded model, about a tenth of the step on a 2-core CPU. With mmap off and trimming
    off, the next step reuses the same pages. The peak stays the peak; the freed memory is simply not returned
    until the process ends. A no-op (False) where glibc's mallopt is unavailable."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))


def _under(context: Callable[[], Any], parts):
    """Each of ``parts`` built inside ``context`` (autocast), the caller's backward of it outside: a method yields
    its parts lazily, so the next part's forward starts only after the previous part's backward."""
    it = iter(parts)
    while True:
        with context():
            part = next(it, None)
        if part is None:
            return
        yield part


def out_of_time(deadline: float | None, device: torch.device) -> bool:
    """Past the wall-clock budget on any rank: every rank stops after the same step."""
    if deadline is None:
        return False
    return sum_over_ranks([float(time.monotonic() > deadline)], device)[0] > 0


def train_loop(model: torch.nn.Module, method: Method, batches: StepBatches, opts: LoopOptions, output_dir: Path, *,
               evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
               export: Callable[[Path], None] | None = None, resume: bool | RunStart = False) -> list[dict[str, Any]]:
    """Train for ``opts.total_steps`` optimizer steps; returns the logged records of this call.

    ``resume``: a RunStart from engine.resume.check_resume (a recipe's: its config goes into every checkpoint,
    and a resume continues from the checkpoint whose config it checked), or True for the last checkpoint unchecked.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    device = params[0].device
    amp = (lambda: torch.autocast(device.type, dtype=opts.autocast)) if opts.autocast else contextlib.nullcontext
    if device.type == "cpu":
        keep_freed_cpu_memory()
    optimizer = OPTIMIZERS[opts.optimizer](params, lr=opts.lr, betas=opts.adam_betas, weight_decay=opts.weight_decay)
    ckpt_root = output_dir / "checkpoints"
    run = resume if isinstance(resume, RunStart) else RunStart()
    if resume is True:
        found = list_checkpoints(ckpt_root)
        if not found:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {ckpt_root}")
        run.checkpoint = found[-1]
    schedule = Schedule(opts.total_steps, opts.warmup_steps, opts.min_lr_ratio)
    state = trainer_state(run.checkpoint) if run.checkpoint is not None else None
    if state is not None:  # the schedule the checkpoint ran on, not one drawn afresh over today's total
        schedule = resumed_schedule(state, schedule, run.extend_steps)
    # A lambda, not the Schedule itself: LambdaLR saves and restores a callable object's fields, which would bring
    # the checkpoint's schedule back over a re-laid one.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s))
    start = 0
    if state is not None:
        start = load_checkpoint(run.checkpoint, model, optimizer, scheduler)["step"]
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in run.changes.items())
        console.print(f"resumed from {run.checkpoint} at step {start}" + (f"; changed: {changed}" if changed else ""))
    w = world()
    log = None
    if w.main:
        trackers = open_trackers(opts.report_to, opts.tracker_project, opts.run_name or output_dir.resolve().name)
        config = yaml.safe_load(run.config_text) if run.config_text else {}  # the run's config.yaml
        log = MetricsLog(output_dir / "metrics.jsonl", resume_step=start, trackers=trackers, config=config)
    records: list[dict[str, Any]] = []
    if state is not None and log is not None:  # the run's history: where it resumed and what a resume changed
        entry: dict[str, Any] = {"from": run.checkpoint.name, "changes": {k: list(v) for k, v in run.changes.items()}}
        if schedule.total_steps != state["total_steps"]:
            entry["lr_schedule"] = asdict(schedule)  # re-laid: steps from here on follow this
        log.write({"step": start, "resumed": entry})
    # Written with every checkpoint, so a later --resume compares against what that checkpoint was trained with.
    record = {"total_steps": opts.total_steps, "schedule": asdict(schedule), "world_size": w.size,
              **({"inputs": run.inputs} if run.config_text is not None else {})}
    texts = {"config.yaml": run.config_text} if run.config_text is not None else None

    def save(step: int) -> None:
        with unsharded(model):  # whole weights for the files (a no-op unless the layers are FSDP2-sharded)
            save_checkpoint(ckpt_root, step, model, optimizer, scheduler, record, keep=opts.save_total_limit,
                            export=export, write_files=w.main, texts=texts)
        barrier()

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=console, transient=True,
                   disable=not console.is_terminal)
    task = bar.add_task(method.name, total=opts.total_steps, completed=start, status="")

    def emit(rec: dict[str, Any]) -> None:
        if log is not None:
            log.write(rec)
            records.append(rec)
            console.print(format_line(rec, opts.total_steps))

    # The budget counts from here (on a resume, from the resume): the step-0 eval and every later one included.
    deadline = time.monotonic() + 60.0 * opts.max_minutes if opts.max_minutes else None
    # Steps that share one batch (an RL schedule's mu: steps per rollout): a budget stops only after the last of
    # them, so the checkpoint it leaves resumes exactly, as train.save_every must be a multiple of mu for.
    shared = getattr(batches, "mu", 1)
    # Leaving the block ends each tracker's run with the final evals, as failed when an exception leaves it.
    with bar, log if log is not None else contextlib.nullcontext():
        if evaluate is not None and start == 0:
            with amp():
                emit({"step": 0, **evaluate(model)})  # the baseline every later eval is compared with
        model.train()
        window_tokens, window_start = 0, time.perf_counter()
        end = opts.total_steps
        for step in range(start, opts.total_steps):
            with amp():  # an RL method samples its rollouts here
                micro = batches.step(step)
            units = sum_over_ranks([float(sum(method.count(b) for b in micro))], device)[0]
            loss_total = torch.zeros((), dtype=torch.float64, device=device)
            metrics: dict[str, float] = {}
            ratios: dict[str, list[float]] = {}  # (sum, count) metrics, see LossPart
            for batch in micro:
                # A method with several networks (PPO's actor and critic) yields its loss in parts, each
                # backpropagated before the next is built, so only one part's activations are alive at a time.
                split = getattr(method, "loss_parts", None)
                parts = split(model, batch) if split is not None else \
                    (method.loss_sum(model, batch) for _ in range(1))  # lazy, so it runs under amp()
                for loss_sum, m in _under(amp, parts):
                    (loss_sum / max(units, 1.0)).backward()
                    loss_total += loss_sum.detach()
                    for k, v in m.items():
                        if isinstance(v, tuple):
                            acc = ratios.setdefault(k, [0.0, 0.0])
                            acc[0], acc[1] = acc[0] + v[0], acc[1] + v[1]
                        else:
                            metrics[k] = metrics.get(k, 0.0) + v / len(micro)
                window_tokens += int(batch.get("num_tokens", 0))
            if w.size > 1:
                all_reduce_grads(params)
            grad_norm = None
            if opts.max_grad_norm is not None:
                grad_norm = clip_grad_norm(params, opts.max_grad_norm) if w.size > 1 else \
                    float(torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if done < opts.total_steps and done % shared == 0 and out_of_time(deadline, device):
                end = done
            if done % opts.log_every == 0 or done == end:
                elapsed = time.perf_counter() - window_start
                # Every rank's share: the loss sums to the global one, token counts to the global throughput,
                # and per-micro-batch means average over ranks.
                keys, rkeys = sorted(metrics), sorted(ratios)
                global_loss, window_tokens, *vals = sum_over_ranks(
                    [float(loss_total), float(window_tokens), *(metrics[k] for k in keys),
                     *(x for k in rkeys for x in ratios[k])], device)
                metrics = {k: v / w.size for k, v in zip(keys, vals)}
                sums = vals[len(keys):]
                metrics.update({k: sums[2 * i] / sums[2 * i + 1] for i, k in enumerate(rkeys) if sums[2 * i + 1]})
                loss = global_loss / max(units, 1.0)
                # loss_units: what the loss averages over this step (trained tokens for SFT, pairs for DPO)
                rec = {"step": done, "loss": loss, "lr": lr, "loss_units": units,
                       "tokens_per_s": window_tokens / max(elapsed, 1e-9), **metrics}
                if grad_norm is not None:
                    rec["grad_norm"] = grad_norm
                emit(rec)
                bar.update(task, status=f"loss {loss:.4f} | {rec['tokens_per_s']:.0f} tok/s")
                window_tokens, window_start = 0, time.perf_counter()
            bar.update(task, completed=done)
            if evaluate is not None and ((opts.eval_every and done % opts.eval_every == 0) or done == end):
                with amp():
                    emit({"step": done, **evaluate(model)})
                model.train()
                window_start = time.perf_counter()
            if done == end < opts.total_steps:
                emit({"step": done, "stopped": {"max_minutes": opts.max_minutes, "steps": done,
                                                "of": opts.total_steps}})
                break
            if opts.save_every and done % opts.save_every == 0 and done != opts.total_steps:
                save(done)
                window_start = time.perf_counter()
    if start < end or not list_checkpoints(ckpt_root):
        save(end)
    return records
