"""Typed, validated run configs: YAML files plus dotted ``key=value`` overrides.

Every section forbids unknown keys; a typo is an error that lists the keys that do exist
(and the closest match), instead of a silently ignored setting.

Layer 1: imports only errors, io, losses (and the stdlib, pydantic, pyyaml). Only recipes, runs, workflow, ship,
demo and cli may import it. ``sections``: the parts of a job; ``jobs``: one schema per method; ``workflow``: the
workflow file; ``loading``: YAML + overrides -> a validated config.
"""

from posttrain.config.distill import DistillConfig, DistillSection, TeacherSpec
from posttrain.config.jobs import (
    WATCH_HELP,
    DPOConfig,
    DPOSection,
    EnvSpec,
    GRPOConfig,
    GRPOSection,
    KTOConfig,
    KTOSection,
    PPOConfig,
    PPOSection,
    PRMConfig,
    PRMSection,
    RewardConfig,
    RewardFnSpec,
    RewardSection,
    RolloutSection,
    SFTConfig,
)
from posttrain.config.loading import dump_config, load_config, load_suites, load_workflow, parse_overrides
from posttrain.config.online import JudgeSpec, OnlineDPOConfig, OnlineSection
from posttrain.config.registry import CONFIGS, JobConfig
from posttrain.config.sections import (
    DataConfig,
    LoraConfig,
    MixConfig,
    ModelConfig,
    PreferenceDataConfig,
    PromptDataConfig,
    ReplayConfig,
    StepDataConfig,
    TrainConfig,
    UnpairedDataConfig,
)
from posttrain.config.workflow import (
    BaselineSpec,
    EvalSetSpec,
    GateRule,
    GateSpec,
    StageSpec,
    SuitesConfig,
    SuiteSpec,
    WorkflowConfig,
)

__all__ = ["CONFIGS", "DistillConfig", "DistillSection", "TeacherSpec",
           "WATCH_HELP", "BaselineSpec", "DPOConfig", "DPOSection", "DataConfig", "EnvSpec",
           "EvalSetSpec", "GRPOConfig", "GRPOSection", "GateRule", "GateSpec", "JobConfig", "JudgeSpec", "KTOConfig",
           "KTOSection", "LoraConfig", "MixConfig", "ModelConfig", "OnlineDPOConfig", "OnlineSection", "PPOConfig",
           "PPOSection", "PRMConfig", "PRMSection", "PreferenceDataConfig", "PromptDataConfig", "ReplayConfig",
           "RewardConfig", "RewardFnSpec", "RewardSection", "RolloutSection", "SFTConfig", "StageSpec",
           "StepDataConfig", "SuiteSpec", "SuitesConfig", "TrainConfig", "UnpairedDataConfig", "WorkflowConfig",
           "dump_config", "load_config", "load_suites", "load_workflow", "parse_overrides"]
