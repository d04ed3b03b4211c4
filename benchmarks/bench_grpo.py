"""LoRA GRPO step time: posttrain vs TRL's GRPOTrainer, side by side, same model, prompts, reward and settings.

Each framework runs in its own subprocess (so peak RSS is per framework), alternately, for ``--rounds`` rounds;
the table reports the median per configuration. The primary figure is seconds per optimizer step, one step being
one complete GRPO iteration: sample ``--per-step`` prompts x ``--group`` completions with the current policy,
score them, compute group advantages and the reference log-probs, then forward/backward every completion in
micro-batches and take one optimizer step. Only steps after ``--warmup`` steps are timed (model loading,
tokenisation and trainer construction are excluded), and both sides are timed the same way: wall-clock from the end
of the previous optimizer step to the end of this one (generation included). The ratio column is posttrain s/step
divided by the best TRL configuration's s/step (the project's target is <= 0.5).

Configurations:
  posttrain  posttrain's engine, built in the worker as ``run_grpo`` builds it: LoRA (``apply_lora``),
             ``disable_dropout``, ``make_reference`` (adapters disabled), ``grpo_schedule`` + ``GRPO`` +
             ``train_loop``; timed from train_loop's own per-step records (its throughput window runs from the
             end of the previous step's log to this step's, so s = fed tokens / tokens_per_s, as in bench_dpo)
  posttrain-compile  posttrain with ``model.compile`` (each decoder layer through torch.compile, compiled in the
             warm-up step; sampling runs eagerly)
  posttrain-server  posttrain with ``rollout.engine: server`` against ``posttrain serve`` in a thread of the worker
             (its own copy of the base, ``--logprobs-mode processed_logprobs``): the adapter is published and
             hot-loaded before every rollout, prompts go as token ids over HTTP
  posttrain-vllm  posttrain with ``rollout.engine: vllm``: a managed ``vllm serve`` from .vllm-venv (``make
             vllm-venv``), started before the timed steps, adapter-only sync before every rollout
  trl        TRL GRPOTrainer with ``peft_config`` (its reference is the policy with the adapter disabled);
             timed by a TrainerCallback between ``on_step_end`` calls
Each also runs as ``<config>-bf16`` and posttrain's as ``<config>-auto`` (see benchmarks/_common.py; -bf16 is
skipped on a CPU without native bf16 unless --force-bf16); the default is posttrain, posttrain-auto, trl, trl-bf16.

Shared settings: the embedded SmolLM2-135M-Instruct in fp32 with SDPA attention, 2 torch threads, LoRA r=16
alpha=32 dropout 0 on q,k,v,o,gate,up,down, dropout disabled, G = ``--group`` completions per prompt,
``--per-step`` prompts per optimizer step (one generation of per-step x G completions per step on both sides),
``--max-new`` new tokens, temperature 0.8, top_p 1, no top-k, KL coefficient (beta) 0.04 against the adapter-off
reference (k3 estimator, no importance-ratio factor: TRL ``use_bias_correction_kl=False``), mu = 1 (TRL
``num_iterations=1``, so neither side computes old log-probs), clip eps 0.2, per-completion token mean then mean
over completions (posttrain aggregation "grpo", TRL ``loss_type="grpo"``), group advantages scaled by the group std
(TRL ``scale_rewards="group"``), lr 1e-4 constant, AdamW, grad clip 1.0, micro-batch min(``--micro-batch`` = 8,
per-step x G) completions with gradient accumulation over the rest of the step, no gradient checkpointing. TRL gets
``bf16=False`` (True for -bf16), ``fp16=False, use_cpu=True, gradient_checkpointing=False`` (GRPOConfig defaults
to bf16 and checkpointing), ``per_device_train_batch_size`` = the micro-batch, ``gradient_accumulation_steps`` =
per-step x G / micro-batch, and leaves ``steps_per_generation`` at its default (= gradient_accumulation_steps),
which makes ``generation_batch_size`` = per-step x G: exactly one generation per optimizer step (the worker checks
this).

Equal work: every completion is exactly ``--max-new`` tokens on both sides, since end of turn cannot be sampled
before then (posttrain ``GRPOParams(min_new_tokens=max_new)``; TRL ``generation_kwargs={"min_new_tokens": ...}``,
merged into its GenerationConfig). Each worker reports the mean completion length it actually generated (table
column 'completion len') and the prompt + completion tokens per step it trained on, which match when both sides
saw the same prompts. How each framework batches generation and lays out its training forwards is its own
(posttrain's grpo_schedule picks its generate batch and may run a prompt once per group; TRL decodes the whole
generation batch in one generate call and feeds prompt + completion per row), so 'fed' work may differ while the
trained completions are the same.

Data: the first ``--prompts`` questions of ``../shared/data/gsm8k/train.jsonl``, with examples/grpo-gsm8k.yaml's
system prompt (and its max_prompt_len / overlong rule), read by posttrain's ``load_prompts`` and rendered with the
embedded model's chat template. Step s uses the prompts posttrain's grpo_schedule visits at step s (its seeded
per-epoch permutation); TRL gets a dataset of exactly those prompts in that order (as conversational ``prompt``
messages plus the ``answer`` column) with ``shuffle_dataset=False``, so its RepeatSampler reads it sequentially.
Both workers check the order they actually used, and the TRL worker checks that TRL's chat-template tokenisation of
every prompt equals posttrain's. Reward: examples/grpo-gsm8k.yaml's reward terms (``gsm8k_answer`` weight 1 plus the
``####`` format regex weight 0.5) as posttrain's ``Combined``, the same object on both sides; TRL's conversational
completions are unwrapped to their text (stripped, as posttrain's are) before scoring.

FLOP ceiling (a rough guide): a GRPO step costs about 8 * N FLOPs per token of each completion's prompt +
completion (sampling 2N, reference forward 2N, policy forward 2N and activation gradients 2N; frozen weights need no
weight gradients), N = the base model's parameter count including the tied embedding/head. Attention is left out,
and a framework that runs a shared prompt once per group does less, so the fraction is an effective one. Sampling
one token at a time is memory-bound, so this fraction stays far below the SFT/DPO ones. The denominator is the fp32
2048x2048 matmul rate measured by this script (before every run and at the end; the best reading counts).

Set-up and run (TRL lives only in the git-ignored .bench-venv; see benchmarks/README.md):
  make bench-grpo BENCH_ARGS="--rounds 2"
  .bench-venv/bin/python benchmarks/bench_grpo.py [--configs posttrain,trl] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from _common import (  # noqa: E402
    base_config,
    base_param_count,
    best_trl,
    bf16_skips,
    expand,
    finish,
    medians,
    peak_rss_mb,
    posttrain_dtype,
    precision,
    ratio_summary,
    run_rounds,
    skipped_rows,
    start,
    trl_numerics,
)

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parents[2] / "shared/data/gsm8k/train.jsonl"
EXAMPLE = REPO / "examples" / "grpo-gsm8k.yaml"
CONFIGS = expand(("posttrain", "posttrain-compile", "posttrain-server", "posttrain-vllm"), ("trl",))
ENGINES = {"posttrain": "hf", "posttrain-compile": "hf", "posttrain-server": "server", "posttrain-vllm": "vllm"}
VLLM_PYTHON = REPO / ".vllm-venv" / "bin" / "python"
VLLM_ARGS = ["--gpu-memory-utilization", "0.15"]  # on CPU: the share of host RAM vLLM reserves for its KV cache
DEFAULT_CONFIGS = ("posttrain", "posttrain-auto", "trl", "trl-bf16")
LORA = dict(r=16, alpha=32, dropout=0.0, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"])
TEMPERATURE = 0.8
TOP_P = 1.0
BETA = 0.04
CLIP_EPS = 0.2
MU = 1
SEED = 0


# ----------------------------------------------------------------------------------------------------------------
# Shared by both workers: the same prompts, reward and visiting order.

def example_config() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(EXAMPLE.read_text())


def load_data(n: int, tokenizer, path: Path = DATA) -> tuple[list[list[int]], list[dict[str, Any]], list[Any], str]:
    """(prompt ids, rows, chats, description) of the first ``n`` GSM8K questions, as a posttrain run reads them."""
    from posttrain.config import PromptDataConfig
    from posttrain.recipes._prompts import read_prompts as load_prompts

    d = example_config()["data"]
    keys = ("prompt_field", "system_prompt", "chat_template", "max_prompt_len", "overlong")
    dcfg = PromptDataConfig(train=str(path), **{k: d[k] for k in keys if k in d})
    prompts, rows, chats, lines = load_prompts(str(path), dcfg, tokenizer, n)
    return prompts, rows, chats, f"{path.name}: " + lines[0].split(": ", 1)[-1]


def random_model(arch: str, tokenizer_dir: str, out: Path) -> str:
    """A random-initialised model of a real architecture (``gpu_check.ARCHS``) with the given tokenizer, saved as an
    HF folder: no hub on the GPU machines, and throughput does not depend on the weights' values."""
    import torch
    from gpu_check import arch_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = arch_config(arch)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(SEED)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def make_reward():
    """examples/grpo-gsm8k.yaml's reward terms as posttrain's ``Combined``."""
    from posttrain.rewards import Combined

    cfg = example_config()
    terms = [(r["name"], float(r.get("weight", 1.0)), dict(r.get("options") or {})) for r in cfg["rewards"]]
    return Combined(terms, cfg.get("reward_reduce", "sum"))


def visit_order(tokenizer, n_prompts: int, per_step: int, total: int) -> list[int]:
    """The prompt index of each of the ``total * per_step`` prompts posttrain's grpo_schedule samples from, in order
    (its seeded permutation per epoch); TRL is fed exactly this sequence."""
    from posttrain.config import GRPOSection
    from posttrain.methods.grpo import GRPOParams, grpo_schedule
    from posttrain.recipes._common import from_section

    plan = grpo_schedule(None, tokenizer, [[0]] * n_prompts, [{}] * n_prompts, [None] * n_prompts, None,
                         from_section(GRPOParams, GRPOSection()), prompts_per_step=per_step, mu=MU,
                         micro_batch_size=1, seed=SEED, reference=None)
    return [i for r in range(total) for i in plan.prompt_indices(r)]


def micro_batch(args: argparse.Namespace) -> tuple[int, int]:
    """(completions per micro-batch, micro-batches per optimizer step)."""
    n = args.per_step * args.group
    micro = min(args.micro_batch, n)
    if n % micro:
        raise SystemExit(f"--per-step x --group = {n} completions per step must be a multiple of the micro-batch "
                         f"{micro}")
    return micro, n // micro


# ----------------------------------------------------------------------------------------------------------------
# Workers (run in subprocesses).

def rollout_engine(kind: str, model, tok, loaded, out: Path):
    """The rollout engine of a posttrain configuration, and what to stop afterwards (a server thread)."""
    from posttrain.config import RolloutSection
    from posttrain.recipes._common import from_section
    from posttrain.rollout.engines import make_engine
    from posttrain.rollout.interface import EngineSettings

    if kind == "hf":
        return None, None
    server = None
    if kind == "server":
        from posttrain.models import load_model
        from posttrain.serve import Engine, Server

        base = load_model(loaded.path, dtype=str(loaded.dtype).removeprefix("torch."), device="cpu")
        server = Server(Engine(base.model, base.tokenizer, base_path=loaded.path, logprobs_mode="processed_logprobs"),
                        out, port=0, timeout_s=3600).start()
        section = RolloutSection(engine="server", server_url=server.url)
    else:
        if not VLLM_PYTHON.exists():
            raise SystemExit(f"posttrain-vllm needs {VLLM_PYTHON}: run `make vllm-venv` first")
        section = RolloutSection(engine="vllm", vllm_python=str(VLLM_PYTHON), vllm_args=VLLM_ARGS)
    engine = make_engine(model, tok, from_section(EngineSettings, section), out, loaded.path)
    return engine, server


def worker_posttrain(args: argparse.Namespace, compiled: bool, dtype: str, engine_kind: str = "hf") -> dict[str, Any]:
    from posttrain.config import GRPOSection, TrainConfig
    from posttrain.engine import LoopOptions, read_metrics, train_loop
    from posttrain.methods.grpo import GRPO, GRPOParams, grpo_schedule
    from posttrain.models import apply_lora, load_model
    from posttrain.models.reference import make_reference
    from posttrain.recipes._common import disable_dropout, from_section, seed_everything

    seed_everything(SEED)
    loaded = load_model(args.model, dtype=dtype, device=args.device)  # its default attention (sdpa_packed)
    tok = loaded.tokenizer
    prompts, rows, chats, data = load_data(args.prompts, tok, Path(args.data))
    n_params = base_param_count(loaded.model)
    seed_everything(SEED)
    model = apply_lora(loaded.model, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                       target_modules=LORA["targets"])
    disable_dropout(model, "GRPO")
    if compiled:
        from posttrain.models.compile import compile_layers

        compile_layers(model)
    micro, _ = micro_batch(args)
    params = from_section(GRPOParams, GRPOSection(  # as TRL's loss_type grpo, scale_rewards group, k3 uncorrected
        group_size=args.group, clip_eps=CLIP_EPS, kl_coef=BETA, temperature=TEMPERATURE, max_new_tokens=args.max_new,
        aggregation="grpo", min_new_tokens=args.max_new, kl_ratio_corrected=False))
    reference = make_reference(model, lora=True, per_token=True, temperature=TEMPERATURE)
    workdir = Path(tempfile.mkdtemp(prefix="bench-posttrain-"))
    engine, server = rollout_engine(engine_kind, model, tok, loaded, workdir)
    plan = grpo_schedule(model, tok, prompts, rows, chats, make_reward(), params, prompts_per_step=args.per_step,
                         mu=MU, micro_batch_size=micro, seed=SEED, reference=reference, top_p=TOP_P, engine=engine)
    total = args.warmup + args.steps
    expected = visit_order(tok, len(prompts), args.per_step, total)

    fed: dict[int, int] = {}
    visited: list[int] = []

    class Counted:  # what each optimizer step feeds (for train_loop's throughput window) and which prompts it used
        def step(self, step: int):
            micro_batches = plan.step(step)
            fed[step + 1] = sum(int(b["num_tokens"]) for b in micro_batches)
            visited.extend(plan.last_rollout["prompts"])
            return micro_batches

    # min_lr_ratio=1 turns posttrain's warmup-cosine schedule into a constant lr, as TRL's "constant".
    # autocast as a recipe run sets it; train_loop samples the rollouts under it too.
    opts = from_section(LoopOptions, TrainConfig(lr=args.lr, min_lr_ratio=1.0, max_grad_norm=1.0, log_every=1),
                        total_steps=total, warmup_steps=0, optimizer="adamw", autocast=loaded.numerics.autocast)
    try:
        train_loop(model, GRPO(params), Counted(), opts, workdir / "run")
        records = [r for r in read_metrics(workdir / "run" / "metrics.jsonl") if "tokens_per_s" in r]
    finally:
        plan.engine.close()
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    steps = []
    for r in records:
        s = r["step"]
        if not fed[s] or not r["tokens_per_s"]:
            raise RuntimeError("posttrain's micro-batches carry no num_tokens; the step time cannot be recovered "
                               "from train_loop's tokens_per_s (update worker_posttrain)")
        idx = visited[(s - 1) * args.per_step:s * args.per_step]
        completion_len = r.get("completion_len")
        n = args.per_step * args.group
        tokens = args.group * sum(len(prompts[i]) for i in idx) + (completion_len or 0) * n
        # tokens_per_s = fed tokens / (time from the end of the previous step's log to this one's): generation,
        # rewards, reference, forward/backward of every micro-batch, clipping and the optimizer step.
        steps.append({"step": s, "seconds": fed[s] / r["tokens_per_s"], "completions": n,
                      "completion_len": completion_len, "tokens": tokens, "fed_tokens": fed[s], "loss": r["loss"],
                      "reward": r.get("reward"), "kl": r.get("kl"), "sample_s": r.get("rollout/sample_s"),
                      "sync_s": r.get("rollout/sync_s"), "mismatch": r.get("mismatch/abs_mean")})
    return {"steps": steps, "n_params": n_params, "data": data, "prompts": len(prompts), "micro_batch": micro,
            "order_matches": visited == expected, "order": visited,
            "numerics": f"posttrain {loaded.numerics.describe()}"}


def worker_trl(args: argparse.Namespace, bf16: bool) -> dict[str, Any]:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.models import load_tokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.set_seed(SEED)
    tok = load_tokenizer(args.model)  # posttrain's loader (AutoTokenizer + EOS as pad if none): the same prompts
    prompts, rows, chats, data = load_data(args.prompts, tok, Path(args.data))
    total = args.warmup + args.steps
    order = visit_order(tok, len(prompts), args.per_step, total)
    ds = Dataset.from_list([{"prompt": chats[i], "answer": rows[i]["answer"], "idx": i} for i in order])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    if args.device != "cpu":
        model.to(args.device)
    n_params = base_param_count(model)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["targets"], bias="none", task_type="CAUSAL_LM")
    micro, accum = micro_batch(args)
    combined = make_reward()

    def gsm8k_reward(prompts, completions, answer, **kw):  # noqa: ARG001 - TRL passes its own extras in kw
        texts = [(c[-1]["content"] if isinstance(c, list) else c).strip() for c in completions]
        return combined(prompts, texts, answer=answer)

    out = tempfile.mkdtemp(prefix="bench-trl-")
    cfg = GRPOConfig(
        output_dir=out, max_steps=total, per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        seed=SEED, data_seed=SEED, bf16=bf16, fp16=False, use_cpu=args.device == "cpu", gradient_checkpointing=False,
        num_generations=args.group, max_completion_length=args.max_new, temperature=TEMPERATURE, top_p=TOP_P,
        top_k=0, generation_kwargs={"min_new_tokens": args.max_new}, shuffle_dataset=False,
        beta=BETA, num_iterations=MU, epsilon=CLIP_EPS, loss_type="grpo", scale_rewards="group",
        use_bias_correction_kl=False, disable_dropout=True, remove_unused_columns=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False,
    )
    n_step = args.per_step * args.group
    if cfg.generation_batch_size != n_step or cfg.steps_per_generation != accum:
        raise RuntimeError(f"TRL would generate {cfg.generation_batch_size} completions every "
                           f"{cfg.steps_per_generation} micro-steps; expected {n_step} every {accum}")

    visited: list[int] = []
    pending = [0, 0, 0]  # completions, completion tokens, prompt tokens of the current optimizer step
    step_counts: list[tuple[int, int, int]] = []

    class Counting(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            visited.extend(x["idx"] for x in inputs[::args.group])  # each prompt arrives G times in a row
            return super()._generate_and_score_completions(inputs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # inputs here are one micro-batch of scored rollouts (after _prepare_inputs)
            pending[0] += int(inputs["completion_mask"].shape[0])
            pending[1] += int(inputs["completion_mask"].sum())
            pending[2] += int(inputs["prompt_mask"].sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    ends: list[float] = []
    logs_at: dict[int, dict[str, float]] = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            ends.clear()
            ends.append(time.perf_counter())  # step 1's start (warm-up, not measured)

        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())
            step_counts.append(tuple(pending))
            pending[:] = [0, 0, 0]

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                logs_at[state.global_step] = dict(logs)

    trainer = Counting(model=model, reward_funcs=[gsm8k_reward], args=cfg, train_dataset=ds, processing_class=tok,
                       peft_config=peft_config, callbacks=[Timer()])
    # Same prompt tokens? TRL renders conversational prompts with apply_chat_template(add_generation_prompt=True).
    differ = 0
    for i in sorted(set(order)):
        enc = tok.apply_chat_template(chats[i], add_generation_prompt=True, tokenize=True, return_dict=True)
        differ += list(enc["input_ids"]) != list(prompts[i])
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)  # save_strategy="no": nothing in it worth keeping
    steps = []
    for i, (n, completion_tokens, prompt_tokens) in enumerate(step_counts):
        logs = logs_at.get(i + 1, {})
        # ends[i + 1] - ends[i]: from the previous step's end (after its optimizer step) to this one's: generation,
        # rewards, reference, forward/backward of every micro-batch, clipping and the optimizer step.
        steps.append({"step": i + 1, "seconds": ends[i + 1] - ends[i], "completions": n,
                      "completion_len": completion_tokens / max(n, 1), "tokens": prompt_tokens + completion_tokens,
                      "loss": logs.get("loss"), "reward": logs.get("reward"), "kl": logs.get("kl")})
    return {"steps": steps, "n_params": n_params, "data": data, "prompts": len(prompts), "micro_batch": micro,
            "order_matches": visited == order, "order": visited, "prompts_differing_from_posttrain": differ,
            "prompts_compared": len(set(order)), "generation_batch_size": cfg.generation_batch_size,
            "steps_per_generation": cfg.steps_per_generation, "gradient_accumulation_steps": accum,
            "gradient_checkpointing": bool(cfg.gradient_checkpointing),
            "optim": str(getattr(cfg.optim, "value", cfg.optim)), "numerics": trl_numerics(bf16)}


def run_worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    name = args.worker
    compiled = base_config(name) == "posttrain-compile"
    result = (worker_trl(args, bf16=precision(name) == "bf16") if name.startswith("trl") else
              worker_posttrain(args, compiled=compiled, dtype=posttrain_dtype(name),
                               engine_kind=ENGINES[base_config(name)]))
    measured = [s for s in result["steps"] if s["step"] > args.warmup]
    if not measured:
        raise RuntimeError("no timed step: --steps must be at least 1")
    seconds = sum(s["seconds"] for s in measured)
    n = len(measured)
    lens = [s["completion_len"] for s in result["steps"] if s["completion_len"] is not None]
    shares = {k: sum(s[k] for s in measured) / seconds for k in ("sample_s", "sync_s")
              if all(s.get(k) is not None for s in measured)}
    mismatch = [s["mismatch"] for s in measured if s.get("mismatch") is not None]
    result.update(sample_share=shares.get("sample_s"), sync_share=shares.get("sync_s"),
                  mismatch=sum(mismatch) / len(mismatch) if mismatch else None)
    if args.device != "cpu":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    result.update(config=name, threads=torch.get_num_threads(), peak_rss_mb=peak_rss_mb(), measured_steps=n,
                  seconds=seconds, s_per_step=seconds / n,
                  completions_per_step=sum(s["completions"] for s in measured) / n,
                  tokens_per_step=sum(s["tokens"] for s in measured) / n,
                  completion_len=sum(lens) / len(lens) if lens else None)
    Path(args.result).write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# Driver.

def table(results: dict[str, list[dict]], ceiling: float, args: argparse.Namespace, skip: dict[str, str]) -> str:
    """Markdown table of the per-config medians, with the s/step ratio to TRL's best measured configuration and the
    FLOP-ceiling share."""
    keys = ("s_per_step", "peak_rss_mb", "completions_per_step", "tokens_per_step", "completion_len")
    med = medians(results, keys)
    best = best_trl(med, "s_per_step", higher_is_better=False)
    n_params = next(rs for rs in results.values() if rs)[0]["n_params"]
    lines = ["| config | s/step | vs best TRL (s/step) | sampling share | sync share | mismatch | peak RSS MB | "
             "completions/step | completion len | tokens/step | runs (s/step) | FLOP ceiling fraction |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def share(c: str, key: str, fmt: str) -> str:
        vals = [r[key] for r in results[c] if r.get(key) is not None]
        return format(sorted(vals)[len(vals) // 2], fmt) if vals else "-"

    for c, m in med.items():
        ratio = f"{m['s_per_step'] / med[best]['s_per_step']:.2f}" if best else "-"
        frac = m["tokens_per_step"] * 8 * n_params / m["s_per_step"] / (ceiling * 1e9)
        runs = ", ".join(f"{r['s_per_step']:.2f}" for r in results[c])
        lines.append(f"| {c} | {m['s_per_step']:.2f} | {ratio} | {share(c, 'sample_share', '.0%')} | "
                     f"{share(c, 'sync_share', '.1%')} | {share(c, 'mismatch', '.1e')} | {m['peak_rss_mb']:.0f} | "
                     f"{m['completions_per_step']:.0f} | {m['completion_len']:.1f} | {m['tokens_per_step']:.0f} | "
                     f"{runs} | {100 * frac:.1f}% |")
    lines += skipped_rows(skip, 12)
    notes = [f"Medians over runs (the 'runs' column lists each run's s/step); {args.steps} timed optimizer steps "
             f"after {args.warmup} warm-up steps per run; a step = {args.per_step} prompts x {args.group} "
             f"completions of {args.max_new} new tokens, micro-batch "
             f"{min(args.micro_batch, args.per_step * args.group)}. "
             "'vs best TRL' = s/step / the best TRL configuration's s/step (target <= 0.5). "
             f"completion len = mean generated tokens per completion over all steps (forced to --max-new); "
             f"tokens/step = prompt + completion tokens of every completion trained. sampling / sync share = "
             "rollout/sample_s and rollout/sync_s over the step time (posttrain); mismatch = the mean "
             "|logp_train - logp_engine| over completion tokens.",
             f"FLOP ceiling: fp32 2048x2048 matmul at {ceiling:.1f} GFLOP/s; 8 x N = 8 x {n_params / 1e6:.1f} M "
             f"FLOPs per token (sample, reference, policy forward and backward), attention left out."]
    for c, rs in results.items():
        bad = [i + 1 for i, r in enumerate(rs) if not r["order_matches"]]
        if bad:
            notes.append(f"WARNING: {c} visited prompts in an order other than posttrain's plan in run(s) {bad}.")
    if best:
        r = results[best][0]
        notes.append(f"TRL prompt tokenisation vs posttrain's: {r['prompts_differing_from_posttrain']} of "
                     f"{r['prompts_compared']} prompts differ; TRL generation_batch_size {r['generation_batch_size']}, "
                     f"steps_per_generation {r['steps_per_generation']}, gradient_accumulation_steps "
                     f"{r['gradient_accumulation_steps']} (micro-batch {r['micro_batch']}), optim {r['optim']}, "
                     f"gradient checkpointing {r['gradient_checkpointing']}.")
    notes += ratio_summary(results, med, "s_per_step", "s/step", False, skip)
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=16, help="GSM8K questions in the fixed training subset")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--per-step", type=int, default=2, help="prompts per optimizer step")
    p.add_argument("--max-new", type=int, default=96, help="new tokens per completion (forced: min = max)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="completions per forward/backward; the rest of the step is gradient accumulation")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (benchmarks/gpu_suite.sh)")
    p.add_argument("--data", default=str(DATA), help="a GSM8K-format JSONL (question, answer)")
    p.add_argument("--arch", default=None, help="instead of --model: a random-initialised model of this architecture "
                   "(benchmarks/gpu_check.py ARCHS) with --tokenizer's tokenizer, as on the GPU machines")
    p.add_argument("--tokenizer", default=None, help="with --arch: a tokenizer folder")
    args, configs = start(p, CONFIGS, DEFAULT_CONFIGS, run_worker, __file__)
    if configs is None:
        return
    if not Path(args.data).exists():
        sys.exit(f"missing {args.data} (GSM8K in ../shared/data/gsm8k/, or --data)")
    if args.arch:
        if not args.tokenizer:
            sys.exit("--arch needs --tokenizer (a tokenizer folder)")
        args.model = random_model(args.arch, args.tokenizer, Path(tempfile.mkdtemp(prefix=f"bench-{args.arch}-")))
    if args.group < 2:
        sys.exit("--group must be at least 2 (group advantages)")
    micro_batch(args)  # fail early on a step that does not split into micro-batches

    common = ["--model", args.model, "--device", args.device, "--data", args.data, "--prompts", str(args.prompts),
              "--group", str(args.group), "--per-step", str(args.per_step), "--max-new", str(args.max_new),
              "--warmup", str(args.warmup), "--steps", str(args.steps), "--micro-batch", str(args.micro_batch),
              "--lr", str(args.lr), "--threads", str(args.threads)]

    def describe(r: dict[str, Any]) -> str:
        s1 = r["steps"][0]
        per_step = ", ".join(f"{s['seconds']:.2f}" for s in r["steps"])
        loss1 = "-" if s1["loss"] is None else f"{s1['loss']:.4f}"
        reward1 = "-" if s1["reward"] is None else f"{s1['reward']:.3f}"
        return (f"{r['s_per_step']:7.2f} s/step ({per_step} per step, warm-up included) completion len "
                f"{r['completion_len']:.1f} {r['tokens_per_step']:6.0f} tokens/step {r['peak_rss_mb']:6.0f} MB "
                f"loss@1 {loss1} reward@1 {reward1} order {'ok' if r['order_matches'] else 'DIFFERS'}")

    skip = bf16_skips(args, configs)
    results, ceilings = run_rounds(args, configs, common, __file__, describe, skip)
    first = next(rs for rs in results.values() if rs)[0]
    print(f"data: {first['data']}; system prompt and rewards from {EXAMPLE.relative_to(REPO)}")
    finish(args, results, ceilings, table(results, max(ceilings), args, skip))


if __name__ == "__main__":
    main()
