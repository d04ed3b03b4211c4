"""What the two online-RL recipes (grpo, ppo) share: their prompts (train and held-out prompt ids, rows and chats)
and their rollout engine. Layer 7, like the recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.config import PromptDataConfig
from posttrain.data import holdout_split
from posttrain.data.prompts import load_prompts
from posttrain.data.templates import resolve_template
from posttrain.engine import console
from posttrain.engine.distributed import world
from posttrain.errors import ConfigError
from posttrain.io import atomic_dir
from posttrain.losses.offpolicy import Correction
from posttrain.models.loading import resolve_model_path
from posttrain.recipes._common import from_section
from posttrain.rollout.client import check_base
from posttrain.rollout.engines import make_engine
from posttrain.rollout.interface import EngineSettings

Prompts = tuple[list[list[int]], list[dict[str, Any]], list[Any]]  # (token ids, rows, chats), one entry per prompt


def read_prompts(path: str, d: PromptDataConfig, tokenizer: Any, limit: int | None) -> tuple[
        list[list[int]], list[dict[str, Any]], list[Any], list[str]]:
    return load_prompts(path, tokenizer, prompt_field=d.prompt_field, system_prompt=d.system_prompt,
                        max_prompt_len=d.max_prompt_len, overlong=d.overlong,
                        chat_template=resolve_template(d.chat_template), limit=limit)


def load_prompt_splits(d: PromptDataConfig, tokenizer: Any) -> tuple[Prompts, Prompts, list[str]]:
    """(train prompts, rows, chats), the same for held-out prompts (data.eval or a split of train), report lines."""
    prompts, rows, chats, lines = read_prompts(d.train, d, tokenizer, d.limit)
    if d.eval:
        held = read_prompts(d.eval, d, tokenizer, d.eval_limit)
        lines += held[3]
        return (prompts, rows, chats), held[:3], lines
    keep, hold = holdout_split(len(prompts), d.eval_fraction, d.split_seed)
    hold = hold[:d.eval_limit] if d.eval_limit else hold
    held = tuple([x[i] for i in hold] for x in (prompts, rows, chats))
    train = tuple([x[i] for i in keep] for x in (prompts, rows, chats))
    if hold:
        lines.append(f"held out {len(hold)} prompts (eval_fraction={d.eval_fraction}, split_seed={d.split_seed})")
    return train, held, lines


def start_engine(cfg: Any, model: Any, tokenizer: Any, out: Path, probe: list[int], temperature: float) -> Any:
    """The configured rollout engine (``cfg.rollout``), checked against the trainer on ``probe`` (a prompt) before
    the first step where it is not the trainer's own sampler, and the importance correction to apply."""
    r = cfg.rollout
    base_dir = resolve_model_path(cfg.model.name)
    if r.engine == "vllm" and cfg.model.init_adapter:  # the policy's base is the merged model, not model.name
        base_dir = str(write_base(model, tokenizer, out / ROLLOUT_BASE))
        console.print(f"rollout engine vllm: serving the base with {cfg.model.init_adapter} merged ({base_dir})")
    engine = make_engine(model, tokenizer, from_section(EngineSettings, r), out, base_dir)
    if r.engine != "hf":
        try:
            gap = check_base(engine, model, tokenizer, probe, temperature)
        except BaseException:
            engine.close()
            raise
        console.print(f"rollout engine {r.engine}: mean |logp_engine - logp_train| = {gap:.2e} on a probe; "
                      f"importance correction: {r.is_correction}")
    return engine, Correction(r.is_correction, r.is_cap)


ROLLOUT_BASE = "rollout_base"  # in the run folder: the merged base a managed vLLM serves (model.init_adapter)


def write_base(model: Any, tokenizer: Any, dest: Path) -> Path:
    """The LoRA policy's frozen base (with model.init_adapter already merged into it) as a plain HF folder: the
    weights under their own names, no adapter layers. Written once per run, atomically."""
    def write(tmp: Path) -> None:
        inner = model.get_base_model()
        state = {k.replace(".base_layer.", "."): v for k, v in inner.state_dict().items() if "lora_" not in k}
        inner.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)

    return dest if (dest / "config.json").exists() else atomic_dir(dest, write)


def check_processes(cfg: Any) -> None:
    """Online RL under torchrun replicates the weights (gradients all-reduced, as DDP): each process decodes its
    share of the rollout with the whole model, which sharded layers would make one gather per decoded token."""
    if world().size > 1 and cfg.train.distributed == "fsdp":
        raise ConfigError(f"train.distributed: fsdp is not supported by {cfg.method} under torchrun: every process "
                          "samples its rollouts with the whole model; use train.distributed: ddp")
