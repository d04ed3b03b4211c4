"""The job configs of the offline and RL methods (sft, dpo, kto, reward, prm, grpo, ppo), and their cross-section checks
(online-dpo: ``config.online``; the table of all: ``config.registry``).

Layer 1 (config): imports only pydantic, the stdlib and ``config.sections``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from posttrain.config.sections import (
    CardConfig,
    DataConfig,
    LoraConfig,
    ModelConfig,
    PreferenceDataConfig,
    PromptDataConfig,
    Section,
    StepDataConfig,
    TrainConfig,
    UnpairedDataConfig,
)


class JobBase(Section):
    """What every training job has: its method, run folder, and the model it trains (LoRA or full)."""
    method: str
    output_dir: str
    finetune: Literal["lora", "full"] = "lora"
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    card: CardConfig = CardConfig()

    @model_validator(mode="after")
    def _check_quantization(self) -> "JobBase":
        if self.model.quantization == "none":
            return self
        if self.finetune != "lora":
            raise ValueError(f"model.quantization: {self.model.quantization} needs finetune: lora (4-bit weights "
                             "are frozen; QLoRA trains adapters on top of them)")
        if self.model.init_adapter:
            raise ValueError("model.init_adapter with model.quantization: merging an adapter into a 4-bit base "
                             "re-quantizes it and loses most of the update; run `posttrain merge ADAPTER --out DIR` "
                             "and set model.name: DIR instead")
        return self


class SFTConfig(JobBase):
    method: Literal["sft"] = "sft"
    output_dir: str = "runs/sft"
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval_samples: int = Field(3, ge=0, description="held-out prompts to generate from at eval time")
    kl_to_base: float = Field(0.0, ge=0.0, description="weight of KL(model || adapter-off base) per trained token, "
                              "against forgetting (LoRA only: the base is the same weights with adapters off)")

    @model_validator(mode="after")
    def _check(self) -> "SFTConfig":
        if self.kl_to_base and self.finetune != "lora":
            raise ValueError("kl_to_base needs finetune: lora (the base is the model with its adapters switched off; "
                             "full fine-tuning would need a second copy of the weights)")
        if self.data.mix and self.data.replay and self.data.mix.ratio + self.data.replay.ratio >= 1.0:
            raise ValueError("data.mix.ratio + data.replay.ratio must stay below 1 (they are shares of the "
                             "training set)")
        if self.data.eval is None and self.data.eval_fraction == 0.0 and self.train.eval_every:
            raise ValueError("train.eval_every is set but there is no held-out data (data.eval / data.eval_fraction)")
        return self



class DPOSection(Section):
    loss: Literal["dpo", "ipo", "ipo_per_token", "simpo", "rpo", "orpo", "cpo"] = "dpo"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    gamma: float = Field(0.5, description="SimPO target margin")
    rpo_alpha: float = Field(1.0, ge=0.0, description="RPO: weight of the chosen responses' per-token NLL")
    orpo_lambda: float = Field(0.1, ge=0.0, description="ORPO: weight of the odds-ratio term (the paper's lambda, "
                               "TRL's ORPOConfig.beta)")
    cpo_alpha: float = Field(1.0, ge=0.0, description="CPO: weight of the chosen responses' per-token NLL")
    precompute_ref: bool = Field(False, description="one reference pass stored on disk; none during training")


# A plain function so 4 jobs with unrelated data sections share it; pydantic collects it only as class attr `_share`.
def check_share_prompt(cfg: Any) -> Any:
    if cfg.data.share_prompt and cfg.model.attn_implementation.startswith("flash"):
        raise ValueError("data.share_prompt needs an attention that takes a custom mask (sdpa, eager); with "
                         f"model.attn_implementation={cfg.model.attn_implementation!r} set data.share_prompt: false")
    return cfg


class DPOConfig(JobBase):
    method: Literal["dpo"] = "dpo"
    output_dir: str = "runs/dpo"
    data: PreferenceDataConfig
    train: TrainConfig = TrainConfig(lr=5e-6, micro_batch_size=2)
    dpo: DPOSection = DPOSection()

    _share = model_validator(mode="after")(check_share_prompt)


class KTOSection(Section):
    beta: float = Field(0.1, gt=0)
    desirable_weight: float | None = Field(
        None, gt=0, description="lambda_D; null (with undesirable_weight null too): data.suggested_weights of the "
        "training rows' class counts (the paper's lambda_D n_D / (lambda_U n_U) in [1, 4/3]); when only the other "
        "is set, 1")
    undesirable_weight: float | None = Field(None, gt=0, description="lambda_U; null: as desirable_weight")


class KTOConfig(JobBase):
    method: Literal["kto"] = "kto"
    output_dir: str = "runs/kto"
    data: UnpairedDataConfig
    train: TrainConfig = TrainConfig(lr=5e-6, micro_batch_size=4)
    kto: KTOSection = KTOSection()

    @model_validator(mode="after")
    def _check(self) -> "KTOConfig":
        if self.train.micro_batch_size < 2:
            raise ValueError(f"train.micro_batch_size={self.train.micro_batch_size}: kto needs at least 2 rows per "
                             "micro-batch, since its reference point z0 pairs each row's prompt with another row's "
                             "completion from the same micro-batch")
        return self


class RewardSection(Section):
    margin: float = Field(0.0, description="Bradley-Terry margin: the score gap a pair should have")
    length_coef: float = Field(
        0.0, description="weight of a fixed length term (per 100 tokens) in the BT logit, to counter length bias")
    length_warn: float = Field(0.5, ge=0.0, le=1.0, description="warn when |corr(score, length)| exceeds this")


class RewardConfig(JobBase):
    method: Literal["reward"] = "reward"
    output_dir: str = "runs/reward"
    data: PreferenceDataConfig
    train: TrainConfig = TrainConfig(lr=1e-4, micro_batch_size=2)
    reward: RewardSection = RewardSection()

    _share = model_validator(mode="after")(check_share_prompt)


class PRMSection(Section):
    neutral: Literal["skip", "positive", "negative"] = Field(
        "skip", description="how a null (neutral) step label is trained: skip (left out of the loss), positive "
        "(as a correct step), negative (as an incorrect one)")
    step_separator: str = Field("\n", description="the text between steps in the assistant message")


class PRMConfig(JobBase):
    method: Literal["prm"] = "prm"
    output_dir: str = "runs/prm"
    data: StepDataConfig
    train: TrainConfig = TrainConfig(lr=1e-4, micro_batch_size=4)
    prm: PRMSection = PRMSection()



class GRPOSection(Section):
    group_size: int = Field(4, ge=2, description="completions per prompt (G)")
    prompts_per_step: int = Field(4, gt=0)
    max_new_tokens: int = Field(128, gt=0)
    min_new_tokens: int = Field(0, ge=0, description="end of turn is not sampled before this many tokens "
                                "(benchmarks set it to max_new_tokens so every framework generates the same)")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    clip_eps: float = Field(0.2, gt=0, lt=1, description="the ratio's clip, both sides unless clip_eps_low/high")
    clip_eps_low: float | None = Field(None, gt=0, lt=1, description="lower clip 1 - eps (default clip_eps)")
    clip_eps_high: float | None = Field(None, gt=0, description="upper clip 1 + eps (default clip_eps); DAPO's "
                                        "clip-higher: 0.28 with clip_eps 0.2")
    dual_clip: float | None = Field(None, gt=1, description="dual clip c for negative advantages: the loss is capped "
                                    "at -c A (Ye et al. 2020; verl's clip_ratio_c, e.g. 3)")
    policy_loss: Literal["ppo_clip", "gspo"] = Field(
        "ppo_clip", description="ppo_clip: a ratio per token; gspo: one length-normalised ratio per completion")
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = Field(
        "grpo", description="the advantage estimator (losses.advantages)")
    std: Literal["sample", "population", "none"] = Field(
        "sample", description="advantage grpo: the group std divided by (sample: TRL's and verl's)")
    kl_coef: float = Field(0.04, ge=0.0, description="weight of the KL to the reference; 0 runs no reference")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="the per-token KL estimate (losses.policy)")
    kl_ratio_corrected: bool = Field(True, description="the KL estimate times pi / pi_old: its gradient is then "
                                     "the reverse KL's (TRL's use_bias_correction_kl)")
    mu: int = Field(1, gt=0, description="optimizer steps per batch of rollouts (old log-probs kept)")
    aggregation: Literal["grpo", "dapo", "dr_grpo"] | None = Field(
        None, description="per-completion token mean (grpo), batch token mean (dapo), sum / max_new_tokens "
        "(dr_grpo); default: the advantage estimator's published one (dr_grpo for dr_grpo, else grpo)")
    dynamic_sampling: Literal["none", "drop_equal"] = Field(
        "none", description="drop_equal: groups whose rewards are all equal are dropped and more prompts drawn "
        "until the rollout is full (DAPO)")
    max_draws: int = Field(3, ge=1, description="dynamic_sampling: draws per rollout at most; then the rollout is "
                           "filled up with dropped groups, counted as dynamic/fallback")
    truncated: Literal["train", "mask"] = Field(
        "train", description="completions cut at max_new_tokens: trained on, or masked from the loss (TRL's "
        "mask_truncated_completions)")

    @model_validator(mode="after")
    def _check_variants(self) -> "GRPOSection":
        if "std" in self.model_fields_set and self.advantage != "grpo":
            raise ValueError(f"grpo.std applies to advantage: grpo only; {self.advantage} fixes its own "
                             "normalisation (losses.advantages)")
        return self


class RolloutSection(Section):
    """Where GRPO's and PPO's completions are sampled (``rollout.engines``), and the train-inference correction."""
    engine: Literal["hf", "server", "vllm"] = Field(
        "hf", description="hf: posttrain's own sampler on the training model; server: an OpenAI-compatible server "
        "that hot-loads LoRA adapters (posttrain serve, vllm serve) at server_url; vllm: a managed `vllm serve` "
        "started from vllm_python (default: this interpreter, when vllm imports here)")
    server_url: str | None = Field(None, description="server: its OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    served_model: str = Field("base", description="server: the base model's served name")
    api_key: str | None = Field(None, description="server: sent as 'Authorization: Bearer KEY'")
    vllm_python: str | None = Field(None, description="vllm: an interpreter that imports vllm (its own venv, e.g. "
                                    ".vllm-venv/bin/python from `make vllm-venv`); posttrain starts `vllm serve` "
                                    "with it, so vLLM's pins never meet posttrain's")
    vllm_args: list[str] = Field(default_factory=list, description="vllm: extra `vllm serve` arguments")
    port: int = Field(0, ge=0, lt=65536, description="vllm_python: the managed server's port (0: a free one)")
    start_timeout_s: float = Field(600.0, gt=0, description="vllm_python: how long the server may take to start")
    request_timeout_s: float = Field(600.0, gt=0, description="server, vllm: how long one rollout request may take")
    async_ahead: bool = Field(False, description="server, vllm: sample rollout k + 1 while training on rollout k "
                              "(its samples one update old, rollout/lag; the importance correction accounts for it)")
    is_correction: Literal["none", "token", "sequence"] = Field(
        "none", description="truncated importance sampling against the engine's log-probs: none (only measured), "
        "token (w_t = min(p_train/p_engine, is_cap)), sequence (one weight per completion)")
    is_cap: float = Field(2.0, gt=0, description="the truncation C of the importance weights (TIS uses 2)")

    @field_validator("vllm_args", mode="before")
    @classmethod
    def _args_as_text(cls, v: Any) -> Any:
        # `rollout.vllm_args=[--max-model-len,1024]` on the command line reads 1024 as a number; it is an argv word
        return [str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in v] \
            if isinstance(v, list) else v


class RewardFnSpec(Section):
    name: str = Field(..., description="gsm8k_answer, regex, json_schema, length_penalty, overlong, reward_model, "
                      "think_format, think_budget, or package.module:fn")
    weight: float = 1.0
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the function")


def _check_mu(cfg: Any, mu: int) -> None:
    if mu > 1 and ((cfg.train.save_every or mu) % mu or (cfg.train.max_steps or mu) % mu):
        raise ValueError(f"with mu={mu} optimizer steps per rollout, train.save_every and train.max_steps must be "
                         "multiples of it (a checkpoint inside a rollout batch could not be resumed exactly)")


WATCH_HELP = ("rewards scored on every rollout and eval but never trained on (a held-out verifier or a second "
              "reward model), logged as watch/* and plotted next to the trained reward: the over-optimisation watch")


class EnvSpec(Section):
    """A multi-turn environment: GRPO's rollouts become trajectories of several turns (``methods.agent``)."""
    name: str = Field("tools", description="tools (the built-in tool environment: calculator, python, "
                      "final_answer) or package.module:MyEnv")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the environment, e.g. "
                                    "tools: [calculator], verifier: number, max_turns: 4, tool_timeout_s: 5")
    max_tokens: int = Field(1024, ge=16, description="the token budget of a whole trajectory (prompt, every turn "
                            "and every tool result); a trajectory that reaches it ends with reward 0")


def _check_env(cfg: Any, refused: dict[str, Any]) -> None:
    """Settings an env (multi-turn rollouts) cannot take: the method's own (``refused``, set when truthy), watch
    terms and rollout.async_ahead."""
    refused = {**refused, "watch": cfg.watch, "rollout.async_ahead": cfg.rollout.async_ahead}
    for key, value in refused.items():
        if value:
            hint = "; add them to rewards with weight 0" if key == "watch" and cfg.method == "grpo" else ""
            raise ValueError(f"{key} is not supported with an env (multi-turn rollouts; the environment gives the "
                             f"reward){hint}")


class GRPOConfig(JobBase):
    method: Literal["grpo"] = "grpo"
    output_dir: str = "runs/grpo"
    data: PromptDataConfig
    train: TrainConfig = TrainConfig(lr=2e-5, micro_batch_size=8)
    grpo: GRPOSection = GRPOSection()
    rollout: RolloutSection = RolloutSection()
    env: EnvSpec | None = Field(None, description="a multi-turn environment; its reward is added to the rewards' "
                                "terms (scored on each trajectory's final answer)")
    rewards: list[RewardFnSpec] = Field(default_factory=list)
    reward_reduce: Literal["sum", "min"] = "sum"
    watch: list[RewardFnSpec] = Field(default_factory=list, description=WATCH_HELP)

    _share = model_validator(mode="after")(check_share_prompt)

    @model_validator(mode="after")
    def _check(self) -> "GRPOConfig":
        _check_mu(self, self.grpo.mu)
        if not self.rewards and self.env is None:
            raise ValueError("rewards: at least one reward function is needed (or an env, whose reward is used)")
        if self.env is not None:
            _check_env(self, {"grpo.dynamic_sampling": self.grpo.dynamic_sampling != "none"})
        if self.grpo.dynamic_sampling != "none" and self.rollout.async_ahead:
            raise ValueError("grpo.dynamic_sampling draws more prompts after scoring; it cannot run with "
                             "rollout.async_ahead, which samples the next rollout before this one is scored")
        for term in [*self.rewards, *self.watch]:  # the overlong reward's budget is the generation budget
            if term.name == "overlong" and "max_tokens" not in term.options:
                term.options["max_tokens"] = self.grpo.max_new_tokens
            if term.name == "think_budget" and "tokenizer" not in term.options:  # it counts the policy's tokens
                term.options["tokenizer"] = self.model.name or "embedded"
        return self


class PPOSection(Section):
    reward_model: str | None = Field(None, description="a `posttrain reward` run folder trained from the same base "
                                     "(model.name and model.init_adapter): its adapter joins the policy's base. "
                                     "Required unless an env gives the reward")
    samples_per_prompt: int = Field(1, ge=1)
    prompts_per_step: int = Field(8, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    kl_coef: float = Field(0.05, ge=0.0, description="per-token KL penalty folded into the reward")
    gamma: float = Field(1.0, gt=0, le=1.0)
    lam: float = Field(0.95, ge=0, le=1.0, description="GAE lambda")
    clip_eps: float = Field(0.2, gt=0, lt=1)
    value_clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0.0, description="weight of the critic's value loss in the summed loss")
    whiten_advantages: bool = True
    missing_eos_penalty: float = Field(0.0, ge=0.0, description="subtracted from the score of a completion cut "
                                       "at max_new_tokens (a reward model reads a truncated answer poorly)")
    critic_init: Literal["reward", "fresh"] = Field(
        "reward", description="start the critic from the reward model's adapter and head, or a fresh adapter "
        "(always fresh with an env, where there is no reward model)")
    mu: int = Field(1, gt=0, description="optimizer steps per batch of rollouts (PPO epochs)")
    step_rewards: str | None = Field(None, description="a `posttrain prm` run folder: its probability that each "
                                     "step is correct becomes a reward on the step's last token, added to "
                                     "reward_model's score on the last token (loaded as a model of its own)")
    step_reward_coef: float = Field(1.0, ge=0.0, description="weight of the step rewards")
    step_reward_form: Literal["prob", "clip"] = Field(
        "prob", description="prob: the probability p (more steps, more reward); clip: min(p - 0.5, 0), Gao et "
        "al. 2024's Clip, so extra steps cannot add reward")
    step_split: Literal["line", "paragraph"] = Field(
        "line", description="how a completion is cut into steps, as `posttrain data prm-labels` cut the PRM's data")


class PPOConfig(JobBase):
    method: Literal["ppo"] = "ppo"
    output_dir: str = "runs/ppo"
    data: PromptDataConfig
    train: TrainConfig = TrainConfig(lr=1e-5, micro_batch_size=8)
    ppo: PPOSection = PPOSection()
    rollout: RolloutSection = RolloutSection()
    env: EnvSpec | None = Field(None, description="a multi-turn environment, whose reward replaces the reward model's")
    watch: list[RewardFnSpec] = Field(default_factory=list, description=WATCH_HELP)

    _share = model_validator(mode="after")(check_share_prompt)

    @model_validator(mode="after")
    def _check(self) -> "PPOConfig":
        if self.finetune != "lora":
            raise ValueError("ppo needs finetune: lora: actor, critic, reward model and reference share one frozen "
                             "base as adapters (full fine-tuning would hold four copies of the model)")
        _check_mu(self, self.ppo.mu)
        if self.env is None and not self.ppo.reward_model:
            raise ValueError("ppo.reward_model: a `posttrain reward` run folder is needed (or an env, whose reward "
                             "is used)")
        if self.env is not None:
            _check_env(self, {"ppo.reward_model": self.ppo.reward_model, "ppo.step_rewards": self.ppo.step_rewards,
                              "ppo.critic_init: reward": "critic_init" in self.ppo.model_fields_set
                              and self.ppo.critic_init == "reward"})
        if self.ppo.step_rewards and self.ppo.step_rewards == self.ppo.reward_model:
            raise ValueError("ppo.step_rewards and ppo.reward_model name the same run: one is a `posttrain prm` run "
                             "(a score per step), the other a `posttrain reward` run (a score per answer)")
        return self
