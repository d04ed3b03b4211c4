"""`posttrain distill`: on-policy distillation (GKD) of a teacher into the student, on prompts.

What one optimizer step does, exactly:
1. Rollout: ``distill.prompts_per_step`` prompts. With probability ``distill.lmbda`` (a draw seeded by the rollout
   number) each gets one sample of the student at ``sample_temperature`` / ``top_p`` (on-policy); otherwise one
   off-policy sequence: the row's own answer (``off_policy: dataset``) or a sample of the teacher (``teacher``).
2. Loss (methods.distill): the teacher's forward under no_grad and the student's on the same sequences, and per
   completion token the divergence (``distill.divergence``: forward_kl, reverse_kl, or the generalized JSD with
   ``beta``, losses.distill) of the two next-token distributions at ``distill.temperature``, summed and divided
   by the step's completion tokens. Prompt tokens carry no loss.
The teacher is one of two kinds (announced at the start with the memory it takes):
- shared base: with ``finetune: lora``, the teacher's model the student's (``model.name``, no ``init_adapter`` on
  either side, the same quantization) and a teacher adapter, the teacher is that adapter loaded beside the
  student's on the same base, switched on for its forwards; it never trains and is never saved with the student;
- separate model: otherwise the teacher (with its adapter merged) is loaded as a frozen model of its own.
A teacher whose tokenizer differs from the student's is refused: cross-tokenizer distillation is out of scope.
Held-out eval (step 0, every train.eval_every, the end): the teacher's greedy answers to the held-out prompts, made
once and cached in the run folder (``teacher_answers.json``), scored as eval/kl (forward KL(teacher || student)
per answer token) and eval/teacher_nll (the student's NLL per answer token).
Writes adapter/ or model/, summary.json, report.html. Under torchrun each process draws its share of the prompts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from posttrain.config import DistillConfig
from posttrain.data.prompts import answer_ids, check_answers, row_answer
from posttrain.data.templates import resolve_template
from posttrain.engine import console, train_loop
from posttrain.engine.resume import Resume
from posttrain.errors import ConfigError
from posttrain.io import atomic_dir, atomic_write_text, read_json
from posttrain.methods.distill import Distill, DistillParams, distill_eval, distill_schedule, teacher_answers
from posttrain.models import load_tokenizer
from posttrain.models.loading import resolve_model_path
from posttrain.models.teacher import (
    STUDENT_ADAPTER,
    FrozenTeacher,
    Teacher,
    attach_teacher_adapter,
    tokenizer_differences,
)
from posttrain.recipes._common import (
    announce,
    begin_run,
    disable_dropout,
    from_section,
    loop_options,
    lora_export,
    prepare_model,
    rank0_after,
    save_config,
    save_trained,
    write_summary,
)
from posttrain.recipes._prompts import check_processes, load_prompt_splits
from posttrain.recipes._resume import check_resume
from posttrain.rollout.schedule import generation_batch
from posttrain.runs import (
    ADAPTER_DIR,
    init_adapter_of,
    load_for_inference,
    quantization_of,
    resolve_adapter,
    run_quantization,
)

ANSWERS_FILE = "teacher_answers.json"  # in the run folder: the teacher's greedy held-out answers, made once


def run(cfg: DistillConfig, *, resume: bool | Resume = False) -> dict[str, Any]:
    start = check_resume(cfg, resume)  # a changed config is refused here, before anything is loaded or written
    check_processes(cfg)
    adapter = teacher_adapter(cfg)
    check_tokenizers(cfg, adapter)  # before any weights load
    job = begin_run(cfg)
    tok, d, dist, t = job.tokenizer, cfg.data, cfg.distill, cfg.train
    (prompts, rows, chats), (held_prompts, _, _), lines = load_prompt_splits(d, tok)
    answers = dataset_answers(cfg, tok, rows, chats, lines)
    announce("data", lines)
    model, report = prepare_model(cfg, job.loaded)
    disable_dropout(model, "distillation")  # the student's forward is the one its divergence is measured on
    teacher, shared = setup_teacher(cfg, model, adapter, job.loaded.device)
    params = from_section(DistillParams, dist)
    schedule = distill_schedule(model, tok, prompts, rows, chats, params, teacher, answers,
                                prompts_per_step=dist.prompts_per_step, micro_batch_size=t.micro_batch_size,
                                seed=t.seed, share_prompt=d.share_prompt)
    total = t.max_steps or schedule.steps_for(t.epochs)
    schedule.total_rollouts = total
    off = "the rows' answers" if dist.off_policy == "dataset" else "the teacher's samples"
    console.print(f"training {total} steps: {dist.prompts_per_step} prompts per step, {dist.lmbda:.0%} of the "
                  f"rollouts the student's samples, the rest {off}; divergence {dist.divergence}"
                  + (f" (beta {dist.beta})" if dist.divergence == "jsd" else ""))
    evaluate = None
    if held_prompts:
        held_answers = cached_teacher_answers(job.out, teacher, tok, held_prompts, dist.eval_max_new_tokens,
                                              generation_batch(len(held_prompts), t.micro_batch_size))
        evaluate = (lambda m: distill_eval(m, teacher, held_prompts, held_answers,
                                           micro_batch_size=t.micro_batch_size, pad_id=schedule.pad_id,
                                           chunk_size=t.loss_chunk_size, share_prompt=d.share_prompt))
    save_config(job.out, cfg)
    opts = loop_options(t, total, cfg.model, job.loaded)
    # Under a shared base, checkpoints and the result hold the student's adapter alone, never the teacher's.
    export = (lambda path: model.save_pretrained(path, selected_adapters=[STUDENT_ADAPTER])) if shared else \
        lora_export(cfg.finetune, model)
    records = train_loop(model, Distill(params, teacher, t.loss_chunk_size), schedule, opts, job.out,
                         evaluate=evaluate, export=export, resume=start)
    if not rank0_after(model, sharded=False):  # rank 0 writes the results; the others hold the same weights
        return {}
    final_dir = save_student(model, tok, job.out, cfg.finetune, shared)
    summary, evals = write_summary(job, total, report, lines, records, final_dir, "eval/kl",
                                   extra={"teacher": teacher_summary(cfg, teacher, adapter)})
    if evals:
        a, b = evals[0], evals[-1]
        console.print(f"held-out KL(teacher || student) per token {a['eval/kl']:.4f} -> {b['eval/kl']:.4f}; "
                      f"student NLL of the teacher's answers {a['eval/teacher_nll']:.4f} -> "
                      f"{b['eval/teacher_nll']:.4f}")
    console.print(f"saved {final_dir}")
    return summary


def teacher_adapter(cfg: DistillConfig) -> str | None:
    """The teacher adapter's folder (a run folder's adapter/ resolved), or None."""
    given = cfg.distill.teacher.adapter
    if not given:
        return None
    try:
        return str(resolve_adapter(given))
    except FileNotFoundError as e:
        raise ConfigError(f"distill.teacher.adapter: {e}") from None


def check_tokenizers(cfg: DistillConfig, adapter: str | None) -> None:
    """Refuse a teacher whose tokenizer is not the student's: the divergence compares two distributions token by
    token, which means nothing across vocabularies."""
    source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else \
        (cfg.distill.teacher.name or cfg.model.name)
    differs = tokenizer_differences(load_tokenizer(cfg.model.name), load_tokenizer(source),
                                    template=cfg.data.chat_template is None)
    if differs:
        raise ConfigError(f"distill.teacher: its tokenizer ({source}) differs from the student's "
                          f"({resolve_model_path(cfg.model.name)}): {'; '.join(differs)}. Distillation here compares "
                          "the two models token by token and needs one tokenizer; cross-tokenizer distillation is "
                          "out of scope")


def shares_base(cfg: DistillConfig, adapter: str | None) -> str | None:
    """None when the teacher can be an adapter on the student's base, else why not."""
    name = cfg.distill.teacher.name or cfg.model.name
    if cfg.finetune != "lora":
        return "finetune: full changes the base weights themselves"
    if adapter is None:
        return "the teacher has no adapter"
    if resolve_model_path(name) != resolve_model_path(cfg.model.name):
        return f"the teacher's model {name} is not the student's {cfg.model.name or 'embedded'}"
    if cfg.model.init_adapter or init_adapter_of(cfg.distill.teacher.adapter or ""):
        return "an init_adapter is merged into one of the two bases"
    if run_quantization(cfg.distill.teacher.adapter or "") != quantization_of(cfg.model):
        return "the teacher was trained on a differently quantized base"
    return None


def setup_teacher(cfg: DistillConfig, model: torch.nn.Module, adapter: str | None,
                  device: torch.device) -> tuple[Teacher, bool]:
    """The teacher (shared base or a separate frozen model, see the module docstring), announced with the memory it
    takes; and whether it shares the student's base."""
    why_not = shares_base(cfg, adapter)
    base_mb = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n) / 2 ** 20
    if why_not is None:
        teacher: Teacher = attach_teacher_adapter(model, adapter)
        console.print(f"teacher: the student's base with adapter {cfg.distill.teacher.adapter} switched on "
                      f"(shared base): {teacher.weight_bytes() / 2 ** 20:.2f} MB of adapter weights beside the "
                      f"{base_mb:.1f} MB base, no second copy")
    else:
        loaded = load_for_inference(cfg.distill.teacher.name or cfg.model.name, cfg.distill.teacher.adapter,
                                    dtype=cfg.model.dtype, device=str(device))
        teacher = FrozenTeacher(loaded.model)
        console.print(f"teacher: {loaded.path}" + (f" + {cfg.distill.teacher.adapter} (merged)" if adapter else "")
                      + f" as a separate frozen model ({why_not}): {teacher.weight_bytes() / 2 ** 20:.1f} MB of "
                      f"weights beside the student's {base_mb:.1f} MB")
    rows = model.get_output_embeddings().weight.shape[0], teacher.model.get_output_embeddings().weight.shape[0]
    if rows[0] != rows[1]:
        raise ConfigError(f"distill.teacher: its LM head covers {rows[1]} tokens, the student's {rows[0]}: the two "
                          "distributions must be over one vocabulary (cross-tokenizer distillation is out of scope)")
    return teacher, why_not is None


def dataset_answers(cfg: DistillConfig, tokenizer: Any, rows: list[dict[str, Any]], chats: list[Any],
                    lines: list[str]) -> list[list[int]] | None:
    """The training prompts' own answers as completion token ids (the off-policy sequences of ``off_policy:
    dataset``), each cut to ``max_new_tokens`` (the cut ones counted in the data report); None when unused."""
    d, dist = cfg.data, cfg.distill
    if dist.off_policy != "dataset" or dist.lmbda >= 1.0:
        return None
    check_answers(d.train, d.prompt_field, d.limit)  # a row without an answer stops here, by file, row and field
    template = resolve_template(d.chat_template)
    out, cut = [], 0
    for row, chat in zip(rows, chats):
        ids = answer_ids(tokenizer, chat, row_answer(row, d.train, None, d.prompt_field), template)
        cut += len(ids) > dist.max_new_tokens
        out.append(ids[:dist.max_new_tokens])
    lines.append(f"{len(out)} answers as off-policy sequences" + (f"; {cut} longer than distill.max_new_tokens="
                                                                 f"{dist.max_new_tokens} cut to it" if cut else ""))
    return out


def cached_teacher_answers(out: Path, teacher: Teacher, tokenizer: Any, prompts: list[list[int]],
                           max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """The teacher's greedy answers to the held-out prompts: read from the run folder when made for these prompts
    and this budget (a resumed run, every eval), else made now and written there."""
    key = hashlib.sha256(json.dumps([prompts, max_new_tokens]).encode()).hexdigest()
    cached = read_json(out / ANSWERS_FILE)
    if isinstance(cached, dict) and cached.get("key") == key:
        console.print(f"teacher's held-out answers: {len(cached['answers'])} from {out / ANSWERS_FILE}")
        return cached["answers"]
    answers = teacher_answers(teacher, tokenizer, prompts, max_new_tokens, batch_size)
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    atomic_write_text(out / ANSWERS_FILE, json.dumps({"key": key, "max_new_tokens": max_new_tokens,
                                                      "answers": answers, "texts": texts}))
    console.print(f"teacher's held-out answers: {len(answers)} made (greedy, at most {max_new_tokens} tokens), "
                  f"cached in {out / ANSWERS_FILE}")
    return answers


def save_student(model: torch.nn.Module, tokenizer: Any, out: Path, finetune: str, shared: bool) -> Path:
    """The student alone: under a shared base, the ``default`` adapter without the teacher's."""
    if not shared:
        return save_trained(model, tokenizer, out, finetune)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, selected_adapters=[STUDENT_ADAPTER])
        tokenizer.save_pretrained(tmp)

    return atomic_dir(out / ADAPTER_DIR, write)


def teacher_summary(cfg: DistillConfig, teacher: Teacher, adapter: str | None) -> dict[str, Any]:
    return {"mode": teacher.mode, "name": cfg.distill.teacher.name or cfg.model.name, "adapter": adapter,
            "weight_bytes": teacher.weight_bytes(), "divergence": cfg.distill.divergence,
            "beta": cfg.distill.beta, "lmbda": cfg.distill.lmbda, "off_policy": cfg.distill.off_policy}
