"""The online (iterative) DPO job: rounds of sample -> score -> pair -> DPO steps (``recipes.online_dpo``).

Layer 1 (config): imports only pydantic, the stdlib and the other ``config`` modules.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.config.jobs import WATCH_HELP, DPOSection, JobBase, RewardFnSpec, RolloutSection, check_share_prompt
from posttrain.config.sections import PromptDataConfig, Section, TrainConfig


class JudgeSpec(Section):
    """The pairwise judge that ranks a prompt's samples (``judge.pairwise``: both orders, optionally calibrated)."""
    model: str | None = Field(None, description="the judging model (a path or `embedded`); null: the policy's own "
                              "starting weights (with LoRA the policy with its adapters off: no second copy)")
    adapter: str | None = Field(None, description="a LoRA adapter (or run folder) on the judging model")
    criterion: str = Field("Which answer is more helpful, correct and concise?",
                           description="what the judge is asked to compare")
    calibrated: bool = Field(True, description="remove the judge's slot preference, measured on content-free "
                             "pairs (judge.pairwise.CalibratedJudge), before both orders are compared")
    margin: float = Field(0.0, ge=0.0, lt=0.5, description="a winner must win both orders by more than this "
                          "(in probability above one half)")


class OnlineSection(Section):
    rounds: int = Field(3, ge=1, description="sample -> score -> pair -> train rounds")
    prompts_per_round: int = Field(16, gt=0, description="prompts sampled each round (a seeded pass over the data)")
    samples: int = Field(4, ge=2, description="completions per prompt (k); the best and worst become a pair")
    steps_per_round: int = Field(8, gt=0, description="DPO optimizer steps on each round's fresh pairs")
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    reference: Literal["initial", "each_round"] = Field(
        "initial", description="initial: the starting policy throughout; each_round: the policy as it is when the "
        "round's pairs are sampled (the reference moves with the policy)")
    judge: JudgeSpec | None = Field(None, description="rank the samples with a pairwise judge instead of rewards")


class OnlineDPOConfig(JobBase):
    method: Literal["online-dpo"] = "online-dpo"
    output_dir: str = "runs/online-dpo"
    data: PromptDataConfig
    train: TrainConfig = TrainConfig(lr=5e-6, micro_batch_size=2)
    dpo: DPOSection = DPOSection()
    online: OnlineSection = OnlineSection()
    rollout: RolloutSection = RolloutSection()
    rewards: list[RewardFnSpec] = Field(default_factory=list, description="the scorer of the samples (unless "
                                        "online.judge): a reward model, verifiable rewards, or both, weighted")
    reward_reduce: Literal["sum", "min"] = "sum"
    watch: list[RewardFnSpec] = Field(default_factory=list, description=WATCH_HELP)

    _share = model_validator(mode="after")(check_share_prompt)

    @model_validator(mode="after")
    def _check(self) -> "OnlineDPOConfig":
        if (self.online.judge is None) == (not self.rewards):
            raise ValueError("online-dpo needs exactly one scorer: rewards (a reward model or verifiable rewards) or "
                             "online.judge (a pairwise judge)" + ("; both are set" if self.rewards else ""))
        if self.train.max_steps is not None:
            raise ValueError("train.max_steps: an online-dpo run is online.rounds x online.steps_per_round steps "
                             f"({self.online.rounds} x {self.online.steps_per_round}); set those instead")
        if self.rollout.async_ahead:
            raise ValueError("rollout.async_ahead: an online-dpo round samples from the policy its previous round "
                             "trained, so there is nothing to sample ahead")
        for term in [*self.rewards, *self.watch]:  # the overlong reward's budget is the generation budget
            if term.name == "overlong" and "max_tokens" not in term.options:
                term.options["max_tokens"] = self.online.max_new_tokens
        return self
