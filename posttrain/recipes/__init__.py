"""One file per ``posttrain <method>``: the whole story of a run, top to bottom, built from the blocks below it.

``RECIPES`` is the one table of methods: the CLI's train commands, the workflow's stage kinds and the config
schemas are checked against it (tests/test_layers.py). A recipe module is imported when it runs, not when the
table is read, so ``posttrain --help`` does not load torch; tests patch ``posttrain.recipes.<name>.run``.

Layer 7: recipes may import every layer below them, and posttrain.config.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Recipe:
    module: str  # the recipe's module, which defines run(cfg, *, resume) and may define evaluate_run(cfg, run_dir)
    help: str  # one line for `posttrain --help`
    generates: bool  # whether the result answers prompts (a reward model scores them instead)

    @property
    def run(self) -> Callable[..., dict[str, Any]]:
        return importlib.import_module(self.module).run

    @property
    def evaluate_run(self) -> Callable[..., dict[str, Any]] | None:
        return getattr(importlib.import_module(self.module), "evaluate_run", None)


RECIPES: dict[str, Recipe] = {
    "sft": Recipe("posttrain.recipes.sft", "supervised fine-tuning (LoRA or full) from a YAML config",
                  generates=True),
    "dpo": Recipe("posttrain.recipes.dpo", "preference optimisation (DPO, IPO, SimPO, RPO) from a YAML config",
                  generates=True),
    "kto": Recipe("posttrain.recipes.kto", "KTO on unpaired rows (a completion labelled desirable or not) from a "
                  "YAML config", generates=True),
    "online-dpo": Recipe("posttrain.recipes.online_dpo", "online (iterative) DPO: rounds of sampling, scoring by "
                         "rewards or a judge, and DPO on the best-vs-worst pairs, from a YAML config", generates=True),
    "reward": Recipe("posttrain.recipes.reward", "a Bradley-Terry reward model (backbone + scalar head) from a YAML "
                     "config", generates=False),
    "prm": Recipe("posttrain.recipes.prm", "a process reward model (backbone + a score at every step's end) from "
                  "a YAML config", generates=False),
    "grpo": Recipe("posttrain.recipes.grpo", "GRPO with verifiable rewards (online RL) from a YAML config",
                   generates=True),
    "distill": Recipe("posttrain.recipes.distill", "on-policy distillation (GKD) of a teacher into the student, "
                      "on prompts", generates=True),
    "ppo": Recipe("posttrain.recipes.ppo", "PPO against a trained reward model; actor, critic, reward and reference "
                  "share one base", generates=True),
}

__all__ = ["RECIPES", "Recipe"]
