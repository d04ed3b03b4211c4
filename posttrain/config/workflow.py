"""The workflow config: held-out set, baseline, eval suites, train stages, gates and export.

Layer 1 (config): imports only pydantic, the stdlib and ``config.sections``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.config.sections import Section


class SuiteSpec(Section):
    """One evaluation suite of a workflow (see posttrain/eval/suites.py for the kinds and their metrics)."""
    kind: Literal["loss", "generation", "preference", "multiple_choice", "abstention", "judge", "lm_eval",
                  "best_of_n"]
    data: str = Field(..., description="the suite's file; ${eval_set} is the workflow's held-out set")
    limit: int | None = Field(None, gt=0, description="only the first N rows")
    options: dict[str, Any] = Field(default_factory=dict, description="kind-specific, e.g. {scorer: json_exact}")
    judge_model: str | None = Field(None, description="kind judge: the judging model (null: the workflow's base)")


class EvalSetSpec(Section):
    """The held-out set, fixed (and hashed) before anything trains: a file, or a split of a data file."""
    file: str | None = Field(None, description="an existing held-out file")
    split: str | None = Field(None, description="a data file to split into ${train_set} and ${eval_set}")
    fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 0
    check_contamination: bool = Field(True, description="fail when a held-out row's 8-grams are >= 50% in ${train_set}")

    @model_validator(mode="after")
    def _one(self) -> "EvalSetSpec":
        if (self.file is None) == (self.split is None):
            raise ValueError("eval_set needs exactly one of file or split")
        return self


class GateRule(Section):
    metric: str = Field(..., description="suite/metric, e.g. in_domain/exact or ood/loss")
    min_lift: float | None = Field(None, description="improvement over the baseline must be at least this")
    min_relative_lift: float | None = Field(None, description="improvement >= this x |baseline| (0.05 = 5%)")
    max_regression: float | None = Field(None, ge=0.0, description="a worsening of at most this")

    @model_validator(mode="after")
    def _some(self) -> "GateRule":
        if self.min_lift is None and self.min_relative_lift is None and self.max_regression is None:
            raise ValueError(f"gate rule on {self.metric!r} sets no threshold: give min_lift, min_relative_lift or "
                             "max_regression")
        return self


class GateSpec(Section):
    candidate: str = Field(..., description="a train stage's name")
    baseline: str = Field("baseline", description="'baseline' (base + system prompt) or an earlier train stage")
    rules: list[GateRule] = Field(..., min_length=1)


class StageSpec(Section):
    """A train stage (train + config), a gate, or an export; exactly one of the three."""
    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    train: Literal["sft", "dpo", "kto", "online-dpo", "distill", "reward", "prm", "grpo", "ppo"] | None = None
    config: str | dict[str, Any] | None = Field(None, description="a job config file or an inline mapping")
    overrides: list[str] = Field(default_factory=list, description="key=value, as on the command line")
    init_from: str | None = Field(None, description="an earlier train stage whose adapter this stage starts from")
    evaluate: bool = Field(True, description="run the workflow's eval suites on the result")
    gate: GateSpec | None = None
    export: str | None = Field(None, description="a train stage whose adapter is exported (PEFT format, checked)")

    @model_validator(mode="after")
    def _one(self) -> "StageSpec":
        kinds = [k for k in ("train", "gate", "export") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"stage {self.name!r} needs exactly one of train, gate, export (got {kinds or 'none'})")
        if self.train is None and (self.config is not None or self.overrides or self.init_from):
            raise ValueError(f"stage {self.name!r}: config, overrides and init_from belong to train stages")
        return self


class BaselineSpec(Section):
    system_prompt: str | None = Field(None, description="the prompt-only baseline: the base model with this prompt")


class SuitesConfig(Section):
    """``posttrain eval TARGET --suites FILE``: the workflow's eval suites, run on one model without a workflow."""
    name: str = "evals"
    system_prompt: str | None = Field(None, description="put before every prompt, as a workflow baseline's is")
    evals: dict[str, SuiteSpec] = Field(..., min_length=1)


class WorkflowConfig(Section):
    """eval set -> baseline -> train stages and gates -> export; each stage cached by the hash of its inputs."""
    name: str = "workflow"
    output_dir: str = "workflow-run"
    model: str | None = Field(None, description="the base model of every stage (null: the embedded SmolLM2)")
    eval_set: EvalSetSpec
    baseline: BaselineSpec = BaselineSpec()
    evals: dict[str, SuiteSpec] = Field(..., min_length=1)
    stages: list[StageSpec] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _refs(self) -> "WorkflowConfig":
        seen: dict[str, str] = {}
        for st in self.stages:
            if st.name in seen or st.name in ("baseline", "eval_set", "evals", "data"):
                raise ValueError(f"stage name {st.name!r} is used twice or reserved")
            refs = [st.init_from, st.export] + ([st.gate.candidate, st.gate.baseline] if st.gate else [])
            for ref in refs:
                if ref is not None and ref != "baseline" and seen.get(ref) != "train":
                    raise ValueError(f"stage {st.name!r} refers to {ref!r}, which is not an earlier train stage")
            seen[st.name] = "train" if st.train else "other"
        return self
