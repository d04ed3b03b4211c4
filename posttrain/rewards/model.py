"""Load trained reward models and score (prompt, response) pairs in batches; ensembles by mean or min."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from posttrain.data.collate import collate_pairs
from posttrain.data.formats import Messages
from posttrain.data.pairs import Pair, render_response
from posttrain.data.templates import resolve_template
from posttrain.models import load_adapter, load_model
from posttrain.models.heads import ScoreModel, load_head
from posttrain.runs import HEAD_FILE, resolve_adapter


def _prompt_messages(prompt: str | Messages) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


# The scoring runs, by method: what the run is called in errors, and the function that loads it.
SCORING_RUNS = {"reward": ("reward-model", "load_reward"), "prm": ("process-reward-model", "load_prm")}


def load_scorer(run_dir: str | Path, method: str, scorer: type[ScoreModel], *, device: str = "auto",
                dtype: str = "auto") -> tuple[ScoreModel, Any, dict[str, Any]]:
    """A ``method`` run folder (reward or prm) as ``scorer`` (its backbone, adapters merged, and score head) in eval
    mode, its tokenizer and its config.yaml; another method's run is refused, naming the function that loads it."""
    import yaml

    run = Path(run_dir)
    kind, _ = SCORING_RUNS[method]
    if not (run / HEAD_FILE).exists():
        raise FileNotFoundError(f"{run} is not a {kind} run folder (no {HEAD_FILE}); train one with "
                                f"`posttrain {method} CONFIG`")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    found = cfg.get("method")
    if found != method:
        hint = f"; load it with posttrain.rewards.{SCORING_RUNS[found][1]}" if found in SCORING_RUNS else ""
        raise ValueError(f"{run} is a {found} run, not a {kind} run{hint}")
    mcfg = cfg.get("model") or {}
    full = (run / "model").is_dir()
    loaded = load_model(str(run / "model") if full else mcfg.get("name"), dtype=dtype, device=device)
    lm = loaded.model
    if not full:
        if mcfg.get("init_adapter"):
            lm = load_adapter(lm, str(resolve_adapter(mcfg["init_adapter"]))).merge_and_unload()
        lm = load_adapter(lm, str(run / "adapter")).merge_and_unload()
    return scorer(lm, load_head(run / HEAD_FILE, lm.dtype, loaded.device)).eval(), loaded.tokenizer, cfg


def run_template(cfg: dict[str, Any]) -> str | None:
    """The chat template a run trained with: its data.chat_template resolved as the recipes resolve it."""
    return resolve_template((cfg.get("data") or {}).get("chat_template"))


class RewardModel:
    """A reward run folder (``posttrain reward``) loaded for scoring."""

    def __init__(self, run_dir: str | Path, *, device: str = "auto", dtype: str = "auto"):
        self.model, self.tokenizer, cfg = load_scorer(run_dir, "reward", ScoreModel, device=device, dtype=dtype)
        self.chat_template = run_template(cfg)

    @torch.no_grad()
    def score(self, prompts: Sequence[str | Messages], responses: Sequence[str], batch_size: int = 8) -> list[float]:
        """One score per (prompt, response); prompts are text (one user turn) or chat messages."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        exs = [render_response(self.tokenizer, _prompt_messages(p), [{"role": "assistant", "content": r}],
                               self.chat_template) for p, r in zip(prompts, responses)]
        out: list[float] = []
        for k in range(0, len(exs), 2 * batch_size):
            chunk = exs[k:k + 2 * batch_size]
            # collate_pairs wants pairs; an odd tail is paired with itself and its copy's score ignored.
            pairs = [Pair(chunk[i], chunk[min(i + 1, len(chunk) - 1)], [], 0, i) for i in range(0, len(chunk), 2)]
            scores, _ = self.model(collate_pairs([[p] for p in pairs], self.tokenizer.pad_token_id))
            out += scores.tolist()[:len(chunk)]
        return out


class Ensemble:
    """Several reward models reduced per item by mean or min (min is the pessimistic, harder-to-hack choice)."""

    def __init__(self, models: Sequence[RewardModel], reduce: str = "mean"):
        if reduce not in ("mean", "min"):
            raise ValueError(f"reduce must be 'mean' or 'min', got {reduce!r}")
        self.models, self.reduce = list(models), reduce

    def score(self, prompts: Sequence[str | Messages], responses: Sequence[str], batch_size: int = 8) -> list[float]:
        table = torch.tensor([m.score(prompts, responses, batch_size) for m in self.models])
        return (table.mean(0) if self.reduce == "mean" else table.min(0).values).tolist()


def load_reward(paths: str | Sequence[str], reduce: str = "mean", **kw) -> RewardModel | Ensemble:
    """``load_reward("runs/rm")`` or ``load_reward(["runs/rm1", "runs/rm2"], reduce="min")``."""
    if isinstance(paths, (str, Path)):
        return RewardModel(paths, **kw)
    return Ensemble([RewardModel(p, **kw) for p in paths], reduce)
