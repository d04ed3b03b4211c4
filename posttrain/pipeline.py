"""Run a configured job end to end: load, validate data, train, evaluate, save. The layer that reads configs."""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from posttrain.config import (
    DataConfig,
    DPOConfig,
    DPOSection,
    GRPOConfig,
    ModelConfig,
    PPOConfig,
    PromptDataConfig,
    RewardConfig,
    SFTConfig,
    TrainConfig,
    dump_config,
)
from posttrain.data import BatchPlan, build_examples, eval_batches, holdout_split
from posttrain.data.render import Example
from posttrain.engine import LoopOptions, console, read_metrics, train_loop
from posttrain.engine.distributed import device_for, gather_for_inference, shard, world
from posttrain.engine.resume import Resume, check_resume
from posttrain.errors import ConfigError
from posttrain.eval import heldout_loss, sample_generations
from posttrain.io import atomic_dir, atomic_write_text
from posttrain.methods import SFT
from posttrain.models import (
    Loaded,
    Quantization,
    apply_lora,
    choose_device,
    dequantize_,
    format_trainable,
    format_weight_bytes,
    load_adapter,
    load_model,
    prepare_full,
    trainable_report,
    weight_bytes,
)
from posttrain.models.compile import compile_layers
from posttrain.models.kernels import apply_liger


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_template(template: str | None) -> str | None:
    if template and template.endswith(".jinja") and Path(template).is_file():
        return Path(template).read_text()
    return template


def quantization_of(mcfg: ModelConfig) -> Quantization | None:
    return None if mcfg.quantization == "none" else Quantization(mcfg.quantization, mcfg.double_quant)


def load_base(mcfg: ModelConfig) -> Loaded:
    return load_model(mcfg.name, dtype=mcfg.dtype, device=device_for(mcfg.device, world()),
                      attn_implementation=mcfg.attn_implementation, quantization=quantization_of(mcfg))


def prepare_model(cfg: SFTConfig | DPOConfig | RewardConfig, loaded: Loaded) -> tuple[torch.nn.Module, dict[str, int]]:
    """Merge ``model.init_adapter`` (if any), switch on checkpointing, and add LoRA or unfreeze everything."""
    model = loaded.model
    base_bytes = weight_bytes(model) if cfg.model.quantization != "none" else None  # the base alone, no adapters
    if cfg.model.init_adapter:
        model = load_adapter(model, str(resolve_adapter(cfg.model.init_adapter))).merge_and_unload()
        console.print(f"merged {cfg.model.init_adapter} into the base")
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seed_everything(cfg.train.seed)  # adapter initialisation does not depend on what loading consumed
    if cfg.finetune == "lora":
        model = apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                           target_modules=cfg.lora.target_modules)
    else:
        model = prepare_full(model)
    if cfg.model.liger:
        console.print(f"Liger kernels: {', '.join(apply_liger(model, next(model.parameters()).device))}")
    if cfg.model.compile:
        console.print(f"torch.compile: {compile_layers(model)} decoder layers (compiled in the first steps)")
    report = trainable_report(model)
    report["numerics"] = loaded.numerics.as_dict() if loaded.numerics else None
    console.print(format_trainable(report))
    if base_bytes:
        report["base_weight_bytes"] = base_bytes
        console.print(format_weight_bytes(base_bytes, loaded.dtype))
    return model, report


def choose_optimizer(t: TrainConfig, mcfg: ModelConfig) -> str:
    if t.optimizer != "auto":
        return t.optimizer
    on_gpu = choose_device(mcfg.device).type == "cuda"
    return "paged_adamw_8bit" if mcfg.quantization != "none" and on_gpu else "adamw"


def shard_if_asked(cfg: SFTConfig | DPOConfig | RewardConfig, model: torch.nn.Module) -> bool:
    """FSDP2 on the decoder layers when torchrun started several processes and train.distributed is fsdp."""
    w = world()
    if w.size > 1 and cfg.train.distributed == "fsdp":
        if cfg.model.compile:  # dynamo would trace FSDP2's gather/reshard hooks inside every compiled layer
            raise ConfigError("model.compile is not supported with train.distributed: fsdp; use "
                              "train.distributed: ddp, or model.compile: false")
        console.print(f"FSDP2: {shard(model)} decoder layers sharded over {w.size} processes")
        return True
    return False


def after_training(model: torch.nn.Module, sharded: bool) -> bool:
    """Whether this process writes the results (rank 0); sharded layers are gathered first, on every rank."""
    if sharded:
        gather_for_inference(model)
    return world().main


def loop_options(t: TrainConfig, total: int, mcfg: ModelConfig, loaded: Loaded) -> LoopOptions:
    return LoopOptions(total_steps=total, lr=t.lr, warmup_steps=round(t.warmup_ratio * total),
                       min_lr_ratio=t.min_lr_ratio, weight_decay=t.weight_decay, adam_betas=t.adam_betas,
                       max_grad_norm=t.max_grad_norm, log_every=t.log_every, eval_every=t.eval_every,
                       save_every=t.save_every, save_total_limit=t.save_total_limit,
                       optimizer=choose_optimizer(t, mcfg),
                       autocast=loaded.numerics.autocast if loaded.numerics else None)  # chosen once, at load


def prepare_data(dcfg: DataConfig, tokenizer) -> tuple[list[Example], list[Example], list[list[dict]], list[str]]:
    """Train and held-out examples, held-out chats (for samples), and report lines."""
    template = resolve_template(dcfg.chat_template)
    kw = dict(fmt=dcfg.format, system_prompt=dcfg.system_prompt, max_seq_len=dcfg.max_seq_len,
              overlong=dcfg.overlong, chat_template=template)
    train, train_rows, report = build_examples(dcfg.train, tokenizer, **kw)
    lines = [report.summary()]
    if dcfg.eval:
        held, held_rows, eval_report = build_examples(dcfg.eval, tokenizer, **kw)
        lines.append(eval_report.summary())
    else:
        keep, hold = holdout_split(len(train), dcfg.eval_fraction, dcfg.split_seed)
        held, held_rows = [train[i] for i in hold], [train_rows[i] for i in hold]
        train = [train[i] for i in keep]
        if hold:
            lines.append(f"held out {len(hold)} of {len(keep) + len(hold)} examples "
                         f"(eval_fraction={dcfg.eval_fraction}, split_seed={dcfg.split_seed})")
    return train, held, [m for _, m in held_rows], lines


def _replay_rows(cfg: SFTConfig, model: torch.nn.Module, tokenizer, count: int) -> tuple[list[dict[str, Any]], int]:
    """The starting model's greedy answers to ``count`` replay prompts (before any update), as chat rows, and how
    many answers were empty (nothing to train on; skipped and counted)."""
    from posttrain.data import load_prompt_chats
    from posttrain.data.mixing import draw
    from posttrain.rollout import generate

    r = cfg.data.replay
    chats = [chat for _, chat in load_prompt_chats(r.prompts, system_prompt=cfg.data.system_prompt)]
    chats = draw(chats, count, r.seed)
    with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
        answers = generate(model, tokenizer, chats, max_new_tokens=r.max_new_tokens,
                           chat_template=resolve_template(cfg.data.chat_template))
    rows = [{"messages": [*c, {"role": "assistant", "content": a}]} for c, a in zip(chats, answers) if a.strip()]
    return rows, len(chats) - len(rows)


def mix_in(cfg: SFTConfig, train: list[Example], model: torch.nn.Module, tokenizer,
           out: Path) -> tuple[list[Example], list[str]]:
    """The training examples with ``data.mix`` and ``data.replay`` added at their shares; report lines.

    Replayed answers are generated once and kept in the run folder (replay.jsonl), so a resumed run trains on the
    same rows."""
    from posttrain.data.mixing import draw, mix_counts

    d = cfg.data
    if d.mix is None and d.replay is None:
        return train, []
    ratios = [d.mix.ratio if d.mix else 0.0, d.replay.ratio if d.replay else 0.0]
    mix_n, replay_n = mix_counts(len(train), ratios)
    kw = dict(fmt="auto", system_prompt=d.system_prompt, max_seq_len=d.max_seq_len, overlong=d.overlong,
              chat_template=resolve_template(d.chat_template))
    mixed, lines = list(train), []
    if d.mix:
        extra = draw(build_examples(d.mix.path, tokenizer, **kw)[0], mix_n, d.mix.seed)
        mixed += extra
        lines.append(f"mixed in {len(extra)} examples of {d.mix.path} (asked {mix_n}, "
                     f"ratio {d.mix.ratio})")
    if d.replay:
        path = out / "replay.jsonl"
        key = json.dumps({"prompts": d.replay.prompts, "count": replay_n, "seed": d.replay.seed,
                          "max_new_tokens": d.replay.max_new_tokens, "model": cfg.model.name,
                          "init_adapter": cfg.model.init_adapter}, sort_keys=True)
        if not (path.exists() and (out / "replay.key").exists() and (out / "replay.key").read_text() == key):
            rows, empty = _replay_rows(cfg, model, tokenizer, replay_n)
            if empty:
                lines.append(f"replay: {empty} empty base answers skipped")
            if not rows:
                raise ConfigError(f"data.replay: the base model gave no non-empty answer to {d.replay.prompts}")
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
            atomic_write_text(out / "replay.key", key)
        extra = build_examples(str(path), tokenizer, **kw)[0]
        mixed += extra
        lines.append(f"replayed {len(extra)} base-model answers to prompts of {d.replay.prompts} "
                     f"(asked {replay_n}, ratio {d.replay.ratio}; in {path})")
    share = 1 - len(train) / len(mixed)
    lines.append(f"training set: {len(train)} task + {len(mixed) - len(train)} mixed = {len(mixed)} examples "
                 f"({share:.1%} mixed)")
    return mixed, lines


def begin_run(cfg: SFTConfig | DPOConfig | RewardConfig) -> tuple[Path, float, Loaded]:
    """The run folder, the start time and the loaded base model (seeded, announced)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.train.seed)
    t0 = time.perf_counter()
    loaded = load_base(cfg.model)
    console.print(f"model {loaded.path} on {loaded.device}, numerics {loaded.numerics.describe()}")
    return out, t0, loaded


def write_summary(out: Path, t0: float, total: int, report: dict, lines: list[str], records: list[dict],
                  final_dir: Path, eval_key: str,
                  extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """summary.json: where the result is, how long it took, and the first and last held-out evals (plus ``extra``);
    then report.html (those numbers as a page, with the curves). Every method ends here, so every run gets both."""
    evals = [r for r in read_metrics(out / "metrics.jsonl") if eval_key in r]
    summary = {"output": str(final_dir), "steps": total, "seconds": round(time.perf_counter() - t0, 1),
               "trainable": report["trainable"], "total_params": report["total"],
               "base_weight_bytes": report.get("base_weight_bytes"), "numerics": report.get("numerics"), "data": lines,
               "eval_before": evals[0] if evals else None, "eval_after": evals[-1] if evals else None,
               "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None), **(extra or {})}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    write_report(out)
    return summary, evals


def write_report(out: Path) -> Path | None:
    """report.html of a finished run; a failure only warns, since the weights and summary.json are already saved."""
    from posttrain.eval.report import write_run_report

    try:
        path = write_run_report(out)
    except Exception as e:  # noqa: BLE001 - a page must never cost the run that it describes
        console.print(f"[yellow]warning: report.html not written: {type(e).__name__}: {e}")
        return None
    console.print(f"report: {path}")
    return path


def run_sft(cfg: SFTConfig, *, resume: bool | Resume = False) -> dict[str, Any]:
    """Supervised fine-tuning (LoRA or full); writes adapter/model, config.yaml, metrics.jsonl, summary.json."""
    start = check_resume(cfg, resume)  # a changed config is refused here, before anything is loaded or written
    out, t0, loaded = begin_run(cfg)
    tok = loaded.tokenizer
    train, held, held_chats, lines = prepare_data(cfg.data, tok)
    for line in lines:
        console.print(f"data: {line}")

    model, report = prepare_model(cfg, loaded)
    train, mix_lines = mix_in(cfg, train, model, tok, out)
    lines += mix_lines
    for line in mix_lines:
        console.print(f"data: {line}")

    t = cfg.train
    w = world()
    plan = BatchPlan(train, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, seed=t.seed,
                     pad_id=tok.pad_token_id, packing=cfg.data.packing, max_seq_len=cfg.data.max_seq_len,
                     world_size=w.size, rank=w.rank)
    total = t.max_steps or plan.steps_for(t.epochs)
    opts = loop_options(t, total, cfg.model, loaded)
    console.print(f"training {total} steps: {len(plan.units)} {plan.unit_name} x {plan.epochs_text(total, t.epochs)}, "
                  f"{plan.per_step} per step ({t.micro_batch_size} x {t.grad_accum} accumulation)"
                  f"{plan.repeat_warning()}")
    held_batches = eval_batches(held, t.micro_batch_size, tok.pad_token_id) if held else []
    evaluate = (lambda m: heldout_loss(m, held_batches, t.loss_chunk_size)) if held_batches else None
    export = (lambda path: save_weights(model, path)) if cfg.finetune == "lora" else None
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    sharded = shard_if_asked(cfg, model)
    records = train_loop(model, SFT(t.loss_chunk_size, cfg.kl_to_base), plan, opts, out, evaluate=evaluate, export=export,
                         resume=start)
    if not after_training(model, sharded):  # rank 0 writes the results; the others hold the same weights
        return {}

    final_dir = save_trained(model, tok, out, cfg.finetune)
    samples = []
    if cfg.eval_samples and held_chats:
        samples = sample_generations(model, tok, held_chats[:cfg.eval_samples],
                                     chat_template=resolve_template(cfg.data.chat_template))
        atomic_write_text(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    summary, evals = write_summary(out, t0, total, report, lines, records, final_dir, "eval/loss")
    if evals:
        console.print(f"held-out loss {evals[0]['eval/loss']:.4f} -> {evals[-1]['eval/loss']:.4f} "
                      f"(ppl {evals[0]['eval/ppl']:.2f} -> {evals[-1]['eval/ppl']:.2f})")
    console.print(f"saved {final_dir}")
    return {**summary, "samples": samples}


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """``save_pretrained`` (a PEFT adapter, or a whole HF model) from the parameters as the module holds them now.

    FSDP2's state-dict hooks report sharded tensors even while a layer is gathered; the live parameters are whole.
    """
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        model.save_pretrained(path, state_dict={n: p.detach() for n, p in model.named_parameters()})
    else:
        model.save_pretrained(path)


def save_trained(model: torch.nn.Module, tokenizer, out: Path, finetune: str) -> Path:
    """The PEFT adapter folder (LoRA) or a standalone HF model folder (full), written atomically."""
    dest = out / ("adapter" if finetune == "lora" else "model")

    def write(tmp: Path) -> None:
        save_weights(model, tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(dest, write)


def load_run_base(model_name: str | None, adapter: str, *, dtype: str = "auto", device: str = "auto") -> Loaded:
    """The base an adapter was trained on: in 4 bits if the run was QLoRA, with the run's ``init_adapter`` (e.g.
    the SFT adapter under a DPO run) merged in."""
    loaded = load_model(model_name, dtype=dtype, device=device, quantization=run_quantization(adapter))
    init = init_adapter_of(adapter)
    if init:
        loaded.model = load_adapter(loaded.model, str(resolve_adapter(init))).merge_and_unload()
    return loaded


def load_for_inference(model_name: str | None, adapter: str | None, *, dtype: str = "auto", device: str = "auto",
                       merge: bool = True) -> Loaded:
    """Base model, optionally with a LoRA adapter (merged for speed unless ``merge=False``).

    ``adapter`` may be an adapter folder or a run folder holding ``adapter/``; with no model name, the base
    recorded in the run's config.yaml (or the adapter's own config) is used.
    """
    if not adapter:
        loaded = load_model(model_name, dtype=dtype, device=device)
        loaded.model.eval()
        return loaded
    adapter_dir = resolve_adapter(adapter)
    loaded = load_run_base(model_name or base_of(adapter), adapter, dtype=dtype, device=device)
    if merge:  # a QLoRA adapter merges into the de-quantized base it was trained against
        dequantize_(loaded.model)
    model = load_adapter(loaded.model, str(adapter_dir))
    loaded.model = model.merge_and_unload() if merge else model
    loaded.model.eval()
    return loaded


def resolve_adapter(path: str) -> Path:
    p = Path(path)
    if (p / "adapter_config.json").exists():
        return p
    if (p / "adapter" / "adapter_config.json").exists():
        return p / "adapter"
    raise FileNotFoundError(f"{path} is neither a PEFT adapter folder nor a run folder with adapter/ in it")


def run_config_of(adapter: str) -> dict:
    p = Path(adapter)
    for cfg in (p / "config.yaml", p.parent / "config.yaml"):
        if cfg.exists():
            import yaml

            return yaml.safe_load(cfg.read_text()) or {}
    return {}


def run_quantization(adapter: str) -> Quantization | None:
    """The 4-bit setting a run's base was trained in (None for an adapter folder without a run config)."""
    model = run_config_of(adapter).get("model") or {}
    return quantization_of(ModelConfig(**{k: v for k, v in model.items() if k in ModelConfig.model_fields}))


def init_adapter_of(adapter: str) -> str | None:
    return (run_config_of(adapter).get("model") or {}).get("init_adapter")


def base_of(adapter: str) -> str | None:
    """The base model a run or adapter was trained from."""
    run = run_config_of(adapter)
    if run:
        return (run.get("model") or {}).get("name")
    meta = json.loads((resolve_adapter(adapter) / "adapter_config.json").read_text())
    return meta.get("base_model_name_or_path")


def prepare_pairs(dcfg, tokenizer) -> tuple[list, list, list[str]]:
    """Train and held-out preference pairs (each list indexed from 0 for reference tables) and report lines."""
    from posttrain.data import build_pairs

    template = resolve_template(dcfg.chat_template)
    kw = dict(max_seq_len=dcfg.max_seq_len, overlong=dcfg.overlong, bad_pairs=dcfg.bad_pairs,
              system_prompt=dcfg.system_prompt, chat_template=template, limit=dcfg.limit)
    train, report = build_pairs(dcfg.train, tokenizer, **kw)
    lines = [report.summary()]
    if dcfg.eval:
        held, eval_report = build_pairs(dcfg.eval, tokenizer, **kw)
        lines.append(eval_report.summary())
    else:
        keep, hold = holdout_split(len(train), dcfg.eval_fraction, dcfg.split_seed)
        held, train = [train[i] for i in hold], [train[i] for i in keep]
        if hold:
            lines.append(f"held out {len(hold)} of {len(keep) + len(hold)} pairs "
                         f"(eval_fraction={dcfg.eval_fraction}, split_seed={dcfg.split_seed})")
    for pairs in (train, held):
        for i, p in enumerate(pairs):
            p.index = i
    return train, held, lines


def fixed_pair_batches(cfg: DPOConfig | RewardConfig, pairs: list, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Evaluation and reference-precomputation batches, laid out as the job's training batches are."""
    from posttrain.data import pair_batches


    return pair_batches(pairs, cfg.train.micro_batch_size, pad_id, cfg.data.share_prompt,
                        cfg.data.max_seq_len if cfg.data.packing else None)


def pair_plan(cfg: DPOConfig | RewardConfig, train: list, pad_id: int):
    """The training batches of a preference job and its number of optimizer steps."""
    from posttrain.data import PairPlan

    t = cfg.train
    w = world()
    plan = PairPlan(train, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, seed=t.seed,
                    pad_id=pad_id, packing=cfg.data.packing, max_seq_len=cfg.data.max_seq_len,
                    share_prompt=cfg.data.share_prompt, world_size=w.size, rank=w.rank)
    return plan, t.max_steps or plan.steps_for(t.epochs)


def disable_dropout(model: torch.nn.Module, method: str) -> None:
    """Policy and reference must be the same network at step 0 (DPO loss ln 2, GRPO ratio 1); dropout would
    make every forward a different one."""
    dropped = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    for m in dropped:
        m.p = 0.0
    if dropped:
        console.print(f"dropout disabled in {len(dropped)} modules ({method} compares the policy with a reference)")


def preference_params(d: DPOSection):
    from posttrain.losses import PreferenceParams

    return PreferenceParams(beta=d.beta, label_smoothing=d.label_smoothing, gamma=d.gamma, alpha=d.rpo_alpha)


def run_dpo(cfg: DPOConfig, *, resume: bool | Resume = False) -> dict[str, Any]:
    """DPO / IPO / SimPO from a base model or an SFT adapter (``model.init_adapter``)."""
    from posttrain.losses import REFERENCE_FREE
    from posttrain.methods import (
        AdapterOffReference,
        FrozenCopyReference,
        Preference,
        precompute_reference,
        preference_eval,
    )

    start = check_resume(cfg, resume)  # a changed config is refused here, before anything is loaded or written
    out, t0, loaded = begin_run(cfg)
    tok = loaded.tokenizer
    train, held, lines = prepare_pairs(cfg.data, tok)
    for line in lines:
        console.print(f"data: {line}")
    model, report = prepare_model(cfg, loaded)
    disable_dropout(model, "DPO")
    t, d = cfg.train, cfg.dpo
    held_batches = fixed_pair_batches(cfg, held, tok.pad_token_id) if held else []

    reference_free = d.loss in REFERENCE_FREE
    if reference_free:
        ref_train = ref_eval = None
        console.print(f"reference: none ({d.loss} is reference-free)")
    else:
        live = AdapterOffReference(t.loss_chunk_size) if cfg.finetune == "lora" else None
        if d.precompute_ref:
            # Before any step the policy is the reference (LoRA's B starts at zero), so one pass over the model
            # as it is now gives the reference log-probs, and no frozen copy is ever made.
            from posttrain.methods import sequence_logps

            now = live or (lambda m, b: sequence_logps(m, b, t.loss_chunk_size)[0].detach())
            with torch.no_grad():
                ref_train = precompute_reference(now, model, fixed_pair_batches(cfg, train, tok.pad_token_id),
                                                 len(train), out / "reference-train.pt")
                ref_eval = precompute_reference(now, model, held_batches, len(held), out / "reference-eval.pt") \
                    if held else None
            console.print(f"reference: precomputed once for {len(train)} + {len(held)} pairs "
                          f"({out / 'reference-train.pt'})")
        else:
            ref_train = ref_eval = live or FrozenCopyReference(model, t.loss_chunk_size)
            console.print("reference: " + ("the policy with adapters disabled (no copy)" if live else
                                          "a frozen copy of the model"))
    params = preference_params(d)
    method = Preference(d.loss, params, ref_train, t.loss_chunk_size)
    eval_method = Preference(d.loss, params, ref_eval, t.loss_chunk_size)

    plan, total = pair_plan(cfg, train, tok.pad_token_id)
    console.print(f"training {total} steps: {len(train)} pairs in {len(plan.units)} rows x "
                  f"{plan.epochs_text(total, t.epochs)}, {plan.per_step} rows per step ({t.micro_batch_size} x "
                  f"{t.grad_accum} accumulation){plan.repeat_warning()}")
    evaluate = (lambda m: preference_eval(m, eval_method, held_batches)) if held_batches else None
    export = (lambda path: save_weights(model, path)) if cfg.finetune == "lora" else None
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    sharded = shard_if_asked(cfg, model)
    records = train_loop(model, method, plan, loop_options(t, total, cfg.model, loaded), out, evaluate=evaluate, export=export,
                         resume=start)
    if not after_training(model, sharded):
        return {}
    final_dir = save_trained(model, tok, out, cfg.finetune)
    summary, evals = write_summary(out, t0, total, report, lines, records, final_dir, "eval/accuracy")
    if evals:
        console.print(f"held-out preference accuracy {evals[0]['eval/accuracy']:.3f} -> "
                      f"{evals[-1]['eval/accuracy']:.3f}; loss {evals[0]['eval/loss']:.4f} -> "
                      f"{evals[-1]['eval/loss']:.4f}")
    console.print(f"saved {final_dir}")
    return summary


def run_reward(cfg: RewardConfig, *, resume: bool | Resume = False) -> dict[str, Any]:
    """A Bradley-Terry reward model: backbone (LoRA or full) + scalar head; loadable with posttrain.rewards."""
    from safetensors.torch import save_file

    from posttrain.methods.reward import RewardBT, ScoreModel, reward_eval
    from posttrain.rewards.model import HEAD_FILE

    start = check_resume(cfg, resume)  # a changed config is refused here, before anything is loaded or written
    out, t0, loaded = begin_run(cfg)
    tok = loaded.tokenizer
    train, held, lines = prepare_pairs(cfg.data, tok)
    for line in lines:
        console.print(f"data: {line}")
    lm, lm_report = prepare_model(cfg, loaded)
    model = ScoreModel(lm)
    report = {**trainable_report(model), "base_weight_bytes": lm_report.get("base_weight_bytes"),
              "numerics": lm_report.get("numerics")}
    t, rc = cfg.train, cfg.reward
    method = RewardBT(rc.margin, rc.length_coef)
    held_batches = fixed_pair_batches(cfg, held, tok.pad_token_id) if held else []
    plan, total = pair_plan(cfg, train, tok.pad_token_id)
    console.print(f"training {total} steps: {len(train)} pairs in {len(plan.units)} rows x "
                  f"{plan.epochs_text(total, t.epochs)}{plan.repeat_warning()}")
    evaluate = (lambda m: reward_eval(m, method, held_batches)) if held_batches else None

    def export(path: Path) -> None:  # a checkpoint's adapter/ folder: the adapter and the score head beside it
        path.mkdir(parents=True, exist_ok=True)
        if cfg.finetune == "lora":
            save_weights(lm, path)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(path / HEAD_FILE))

    atomic_write_text(out / "config.yaml", dump_config(cfg))
    sharded = shard_if_asked(cfg, model)
    records = train_loop(model, method, plan, loop_options(t, total, cfg.model, loaded), out, evaluate=evaluate, export=export,
                         resume=start)
    if not after_training(model, sharded):
        return {}
    final_dir = save_trained(lm, tok, out, cfg.finetune)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(out / HEAD_FILE))
    summary, evals = write_summary(out, t0, total, report, lines, records, out, "eval/accuracy")
    if evals:
        last = evals[-1]
        console.print(f"held-out pairwise accuracy {evals[0]['eval/accuracy']:.3f} -> {last['eval/accuracy']:.3f}; "
                      f"scores chosen {last['eval/score_chosen']:.3f} vs rejected {last['eval/score_rejected']:.3f} "
                      f"(std {last['eval/score_std']:.3f}); corr(score, length) {last['eval/length_corr']:+.2f}")
        if abs(last["eval/length_corr"]) > rc.length_warn:
            console.print(f"[yellow]warning: the score follows response length (|corr| > {rc.length_warn}); "
                          "a policy can raise it by writing longer. Consider reward.length_coef.[/]")
    console.print(f"saved {final_dir} and {out / HEAD_FILE}")
    return summary


def eval_preference_run(cfg: DPOConfig | RewardConfig, run_dir: Path) -> dict[str, Any]:
    """Held-out metrics of a finished dpo or reward run: preference accuracy, rewards/scores, loss."""
    from posttrain.methods import AdapterOffReference, FrozenCopyReference, Preference, preference_eval
    from posttrain.methods.reward import RewardBT, reward_eval
    from posttrain.rewards import RewardModel

    if cfg.method == "reward":
        rm = RewardModel(run_dir, device=cfg.model.device, dtype=cfg.model.dtype)
        _, held, _ = prepare_pairs(cfg.data, rm.tokenizer)
        batches = fixed_pair_batches(cfg, held, rm.tokenizer.pad_token_id)
        return {"run": str(run_dir), "pairs": len(held),
                **reward_eval(rm.model, RewardBT(cfg.reward.margin, cfg.reward.length_coef), batches)}
    base = load_base(cfg.model)
    if cfg.model.init_adapter:
        base.model = load_adapter(base.model, str(resolve_adapter(cfg.model.init_adapter))).merge_and_unload()
    if cfg.finetune == "lora":
        model, reference = load_adapter(base.model, str(run_dir / "adapter")), AdapterOffReference()
    else:
        reference = FrozenCopyReference(base.model)
        model = load_model(str(run_dir / "model"), dtype=cfg.model.dtype, device=cfg.model.device).model
    _, held, _ = prepare_pairs(cfg.data, base.tokenizer)
    d = cfg.dpo
    method = Preference(d.loss, preference_params(d), reference, cfg.train.loss_chunk_size)
    batches = fixed_pair_batches(cfg, held, base.tokenizer.pad_token_id)
    return {"run": str(run_dir), "pairs": len(held), **preference_eval(model, method, batches)}


def _dialogue_before_answer(row: dict[str, Any], path: str, num: int) -> list[dict[str, str]]:
    from posttrain.data.preference import _conversation

    conv = _conversation(row["chosen"], path, num, "chosen")
    return conv[:-1] if conv and conv[-1].get("role") == "assistant" else []


def load_prompts(path: str, dcfg: PromptDataConfig, tokenizer,
                 limit: int | None = None) -> tuple[list[list[int]], list[dict[str, Any]], list[Any], list[str]]:
    """Prompt token ids, the rows (their other columns feed the rewards), the prompts as chats, report lines."""
    from posttrain.data import read_rows
    from posttrain.data.formats import validate_messages
    from posttrain.data.render import has_chat_template, render_prompt
    from posttrain.errors import DataError

    template = resolve_template(dcfg.chat_template)
    add_special = not has_chat_template(tokenizer, template)
    rows = read_rows(path)[:limit] if limit else read_rows(path)
    ids, kept, chats, dropped = [], [], [], []
    for num, row in rows:
        value = row.get(dcfg.prompt_field)
        if isinstance(value, str) and value.strip():
            chat = [{"role": "user", "content": value}]
        elif isinstance(value, list) and value:
            # validated with a stand-in answer after it; the normalised turns (text parts joined) are kept
            chat = validate_messages(list(value) + [{"role": "assistant", "content": "x"}], path, num,
                                     dcfg.prompt_field)[:-1]
        elif value is None and isinstance(row.get("chosen"), (str, list)) and \
                (dialogue := _dialogue_before_answer(row, path, num)):
            chat = dialogue  # a preference file: the dialogue its answers reply to
        else:
            raise DataError(path, num, dcfg.prompt_field, "missing or empty prompt (data.prompt_field names the "
                            "column; a preference row's chosen conversation also gives one; this row has "
                            f"{', '.join(map(repr, row)) or 'no columns'})")
        if dcfg.system_prompt and chat[0].get("role") != "system":
            chat = [{"role": "system", "content": dcfg.system_prompt}, *chat]
        tokens = tokenizer(render_prompt(tokenizer, chat, template), add_special_tokens=add_special)["input_ids"]
        if len(tokens) > dcfg.max_prompt_len:
            if dcfg.overlong == "error":
                raise DataError(path, num, dcfg.prompt_field, f"{len(tokens)} tokens, more than "
                                f"data.max_prompt_len={dcfg.max_prompt_len}; raise it or set data.overlong: drop")
            dropped.append(num)
            continue
        ids.append(tokens)
        kept.append(row)
        chats.append(chat)
    line = f"{path}: {len(rows)} prompts, {len(ids)} kept" + (f"; {len(dropped)} dropped as over-long" if dropped
                                                              else "")
    if not ids:
        raise DataError(path, None, None, "no prompt is left (see data.max_prompt_len and data.overlong)")
    return ids, kept, chats, [line]


def load_prompt_splits(d: PromptDataConfig, tok) -> tuple[tuple[list, list, list], tuple[list, list, list], list[str]]:
    """(train prompts, rows, chats), the same for held-out prompts (data.eval or a split of train), report lines."""
    prompts, rows, chats, lines = load_prompts(d.train, d, tok, d.limit)
    if d.eval:
        held = load_prompts(d.eval, d, tok, d.eval_limit)
        lines += held[3]
        return (prompts, rows, chats), held[:3], lines
    keep, hold = holdout_split(len(prompts), d.eval_fraction, d.split_seed)
    hold = hold[:d.eval_limit] if d.eval_limit else hold
    held = tuple([x[i] for i in hold] for x in (prompts, rows, chats))
    train = tuple([x[i] for i in keep] for x in (prompts, rows, chats))
    if hold:
        lines.append(f"held out {len(hold)} prompts (eval_fraction={d.eval_fraction}, split_seed={d.split_seed})")
    return train, held, lines


def combined(terms: list, reduce: str = "sum"):
    from posttrain.rewards import Combined

    return Combined([(r.name, r.weight, r.options) for r in terms], reduce) if terms else None


def write_watch_plot(out: Path, title: str) -> Path | None:
    """rewards.svg: the trained reward per step and held-out, next to the watch terms when configured."""
    from posttrain.engine.plot import panels_svg

    recs = read_metrics(out / "metrics.jsonl")
    curve = lambda key: [(r["step"], r[key]) for r in recs if key in r]  # noqa: E731
    watch_keys = sorted({k for r in recs for k in r if k.startswith("watch/")})
    panels = {"reward (trained on), rollouts": {"mean": curve("reward")},
              "watch (never trained on), rollouts": {"watch": curve("watch"), **{k: curve(k) for k in watch_keys}},
              "held-out, greedy": {"reward": curve("eval/reward"), "watch": curve("eval/watch")}}
    try:
        svg = panels_svg(title, panels)
    except ValueError:
        return None
    atomic_write_text(out / "rewards.svg", svg)
    return out / "rewards.svg"


def run_grpo(cfg: GRPOConfig, *, resume: bool | Resume = False) -> dict[str, Any]:
    """GRPO with verifiable rewards from a base model or an SFT adapter (``model.init_adapter``)."""
    from posttrain.methods.grpo import GRPO, GRPOParams, RolloutPlan, grpo_eval, token_reference
    from posttrain.rollout.plan import generation_batch

    start = check_resume(cfg, resume)  # a changed config is refused here, before anything is loaded or written
    out, t0, loaded = begin_run(cfg)
    tok = loaded.tokenizer
    d, g, t = cfg.data, cfg.grpo, cfg.train
    (prompts, rows, chats), (held_prompts, held_rows, held_chats), lines = load_prompt_splits(d, tok)
    for line in lines:
        console.print(f"data: {line}")
    reward, watch = combined(cfg.rewards, cfg.reward_reduce), combined(cfg.watch)
    model, report = prepare_model(cfg, loaded)
    disable_dropout(model, "GRPO")
    params = GRPOParams(group_size=g.group_size, clip_eps=g.clip_eps, kl_coef=g.kl_coef, temperature=g.temperature,
                        max_new_tokens=g.max_new_tokens, aggregation=g.aggregation, min_new_tokens=g.min_new_tokens)
    reference = token_reference(model, cfg.finetune == "lora", g.temperature, t.loss_chunk_size) \
        if g.kl_coef > 0 else None
    plan = RolloutPlan(model, tok, prompts, rows, chats, reward, params, prompts_per_step=g.prompts_per_step,
                       mu=g.mu, micro_batch_size=t.micro_batch_size, seed=t.seed, reference=reference, top_p=g.top_p,
                       chunk_size=t.loss_chunk_size, share_prompt=d.share_prompt, watch=watch)
    total = t.max_steps or plan.steps_for(t.epochs)
    console.print(f"training {total} steps: {g.prompts_per_step} prompts x {g.group_size} completions per rollout, "
                  f"{g.mu} step(s) per rollout; reference: " + ("none (kl_coef 0)" if reference is None else
                  "adapters disabled" if cfg.finetune == "lora" else "a frozen copy"))
    evaluate = (lambda m: grpo_eval(m, tok, held_prompts, held_rows, held_chats, reward, g.max_new_tokens,
                                    generation_batch(len(held_prompts), t.micro_batch_size), watch)) \
        if held_prompts else None
    export = (lambda path: save_weights(model, path)) if cfg.finetune == "lora" else None
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    records = train_loop(model, GRPO(params, t.loss_chunk_size), plan, loop_options(t, total, cfg.model, loaded), out,
                         evaluate=evaluate, export=export, resume=start)
    final_dir = save_trained(model, tok, out, cfg.finetune)
    summary, evals = write_summary(out, t0, total, report, lines, records, final_dir, "eval/reward")
    if evals:
        console.print(f"held-out reward (greedy) {evals[0]['eval/reward']:.3f} -> {evals[-1]['eval/reward']:.3f}")
    plot = write_watch_plot(out, f"GRPO rewards: {out.name}")
    console.print(f"saved {final_dir}" + (f"; curves in {plot}" if plot else ""))
    return summary


def _check_reward_base(cfg: PPOConfig, rm_cfg: dict) -> None:
    """The reward adapter only means what it was trained to mean on the base it was trained on."""
    from posttrain.models.loading import resolve_model_path

    mine = (resolve_model_path(cfg.model.name), cfg.model.init_adapter or None)
    rm_model = rm_cfg.get("model") or {}
    theirs = (resolve_model_path(rm_model.get("name")), rm_model.get("init_adapter") or None)
    if mine != theirs or rm_cfg.get("finetune", "lora") != "lora":
        raise ConfigError(f"ppo.reward_model {cfg.ppo.reward_model} was trained from {theirs[0]} + adapter "
                         f"{theirs[1]} ({rm_cfg.get('finetune')}); this run's base is {mine[0]} + adapter {mine[1]}. "
                         "The four PPO roles share one base, so train the reward model with finetune: lora from the "
                         "same model.name and model.init_adapter")


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        current = int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20
    except OSError:
        current = float("nan")
    return current, peak


def build_roles(cfg: PPOConfig, loaded: Loaded):
    """Actor LoRA (``default``), the reward run's adapter as ``reward`` (frozen) and as the critic's start
    (``critic``, trainable) on the one base; value head from the score head (or zeros)."""
    import yaml
    from safetensors.torch import load_file

    from posttrain.methods.ppo import ACTOR, CRITIC, REWARD, SharedRoles
    from posttrain.rewards.model import HEAD_FILE

    rm = Path(cfg.ppo.reward_model)
    if not (rm / HEAD_FILE).exists() or not (rm / "config.yaml").exists():
        raise FileNotFoundError(f"ppo.reward_model: {rm} is not a `posttrain reward` run folder (needs config.yaml, "
                                f"adapter/ and {HEAD_FILE})")
    _check_reward_base(cfg, yaml.safe_load((rm / "config.yaml").read_text()) or {})
    policy, _ = prepare_model(cfg, loaded)
    policy.load_adapter(str(rm / "adapter"), adapter_name=REWARD, is_trainable=False)
    if cfg.ppo.critic_init == "reward":
        policy.load_adapter(str(rm / "adapter"), adapter_name=CRITIC, is_trainable=True)
    else:
        policy.add_adapter(CRITIC, policy.peft_config[ACTOR])
    policy.set_adapter(ACTOR)
    for name, p in policy.named_parameters():  # actor and critic adapters train; the base and the reward do not
        p.requires_grad_("lora_" in name and (f".{ACTOR}." in name or f".{CRITIC}." in name))
    param = next(policy.parameters())
    state = load_file(str(rm / HEAD_FILE))
    score_head = torch.nn.Linear(state["weight"].shape[1], 1, dtype=param.dtype, device=param.device)
    score_head.load_state_dict({k: v.to(param.dtype) for k, v in state.items()})
    value_head = torch.nn.Linear(state["weight"].shape[1], 1, dtype=param.dtype, device=param.device)
    if cfg.ppo.critic_init == "reward":
        value_head.load_state_dict(score_head.state_dict())
    else:
        torch.nn.init.zeros_(value_head.weight)
        torch.nn.init.zeros_(value_head.bias)
    roles = SharedRoles(policy, value_head, score_head)
    return roles, trainable_report(roles)


def role_memory(roles) -> dict[str, float]:
    """Bytes of the shared base, of each adapter and head, and the weights four separate copies would hold."""
    base = sum(p.numel() * p.element_size() for n, p in roles.policy.named_parameters() if "lora_" not in n)
    adapters = {}
    for n, p in roles.policy.named_parameters():
        if "lora_" in n:
            role = n.split(".")[-2]
            adapters[role] = adapters.get(role, 0) + p.numel() * p.element_size()
    heads = sum(p.numel() * p.element_size() for m in (roles.value_head, roles.score_head) for p in m.parameters())
    mb = 2 ** 20
    shared = base + sum(adapters.values()) + heads
    four = 4 * base + adapters.get("default", 0) + adapters.get("critic", 0) + heads
    return {"base_weights_mb": round(base / mb, 1),
            **{f"adapter_{k}_mb": round(v / mb, 1) for k, v in adapters.items()},
            "heads_mb": round(heads / mb, 3), "shared_weights_mb": round(shared / mb, 1),
            "four_copies_weights_mb": round(four / mb, 1)}


def run_ppo(cfg: PPOConfig, *, resume: bool | Resume = False) -> dict[str, Any]:
    """PPO against a trained reward model with actor, critic, reward and reference on one frozen base."""
    from posttrain.methods.ppo import ACTOR, CRITIC, PPO, PPOParams, PPOPlan, ppo_eval
    from posttrain.rollout.plan import generation_batch

    start = check_resume(cfg, resume)  # a changed config is refused here, before anything is loaded or written
    out, t0, loaded = begin_run(cfg)
    rss_loaded = _rss_mb()[0]
    tok = loaded.tokenizer
    d, p, t = cfg.data, cfg.ppo, cfg.train
    (prompts, rows, chats), (held_prompts, held_rows, held_chats), lines = load_prompt_splits(d, tok)
    for line in lines:
        console.print(f"data: {line}")
    watch = combined(cfg.watch)
    roles, report = build_roles(cfg, loaded)
    report["numerics"] = loaded.numerics.as_dict() if loaded.numerics else None
    console.print(format_trainable(report))
    disable_dropout(roles, "PPO")
    memory = role_memory(roles)
    console.print(f"memory: one base {memory['base_weights_mb']} MB shared by actor, critic, reward and reference "
                  f"({memory['shared_weights_mb']} MB of weights in all; four copies: "
                  f"{memory['four_copies_weights_mb']} MB)")
    params = PPOParams(samples_per_prompt=p.samples_per_prompt, max_new_tokens=p.max_new_tokens,
                       min_new_tokens=p.min_new_tokens, temperature=p.temperature, top_p=p.top_p, kl_coef=p.kl_coef,
                       gamma=p.gamma, lam=p.lam, clip_eps=p.clip_eps, value_clip=p.value_clip, vf_coef=p.vf_coef,
                       whiten_advantages=p.whiten_advantages, missing_eos_penalty=p.missing_eos_penalty)
    plan = PPOPlan(roles, tok, prompts, rows, chats, params, prompts_per_step=p.prompts_per_step, mu=p.mu,
                   micro_batch_size=t.micro_batch_size, seed=t.seed, chunk_size=t.loss_chunk_size,
                   share_prompt=d.share_prompt, watch=watch)
    total = t.max_steps or plan.steps_for(t.epochs)
    console.print(f"training {total} steps: {p.prompts_per_step} prompts x {p.samples_per_prompt} per rollout, "
                  f"{p.mu} step(s) per rollout; reward model {p.reward_model}")
    pad = plan.pad_id
    evaluate = (lambda m: ppo_eval(m, tok, held_prompts, held_rows, held_chats, p.max_new_tokens,
                                   generation_batch(len(held_prompts), t.micro_batch_size), pad, watch,
                                   d.share_prompt)) if held_prompts else None

    def save_critic(path: Path) -> None:  # a PEFT adapter folder plus the value head
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        roles.policy.peft_config[CRITIC].save_pretrained(str(path))
        save_file(get_peft_model_state_dict(roles.policy, adapter_name=CRITIC), str(path / "adapter_model.safetensors"))
        save_file({k: v.contiguous() for k, v in roles.value_head.state_dict().items()},
                  str(path / "value_head.safetensors"))

    def export(path: Path) -> None:  # a checkpoint: the actor as a plain PEFT adapter, the critic beside it
        roles.policy.save_pretrained(path, selected_adapters=[ACTOR])
        save_critic(path.parent / "critic")

    atomic_write_text(out / "config.yaml", dump_config(cfg))
    records = train_loop(roles, PPO(params, t.loss_chunk_size), plan, loop_options(t, total, cfg.model, loaded), out,
                         evaluate=evaluate, export=export, resume=start)
    final = atomic_dir(out / "adapter", lambda tmp: (roles.policy.save_pretrained(tmp, selected_adapters=[ACTOR]),
                                                     tok.save_pretrained(tmp)))
    atomic_dir(out / "critic", save_critic)
    current, peak = _rss_mb()
    memory.update(peak_rss_mb=round(peak, 1), rss_after_model_load_mb=round(rss_loaded, 1))
    summary, evals = write_summary(out, t0, total, report, lines, records, final, "eval/reward", {"memory": memory})
    if evals:
        console.print(f"held-out reward-model score (greedy) {evals[0]['eval/reward']:.3f} -> "
                      f"{evals[-1]['eval/reward']:.3f}")
    console.print(f"peak memory {peak:.0f} MB (after loading the model: {rss_loaded:.0f} MB); four separate copies "
                  f"would hold {memory['four_copies_weights_mb']} MB of weights alone")
    plot = write_watch_plot(out, f"PPO rewards: {out.name}")
    console.print(f"saved {final} (actor) and {out / 'critic'} (critic)"
                  + (f"; curves in {plot}" if plot else ""))
    return summary
