"""The one table of job schemas, by method name: what ``load_config`` validates a job file against.

Layer 1 (config): imports only the other ``config`` modules.
"""

from __future__ import annotations

from posttrain.config.distill import DistillConfig
from posttrain.config.jobs import DPOConfig, GRPOConfig, KTOConfig, PPOConfig, PRMConfig, RewardConfig, SFTConfig
from posttrain.config.online import OnlineDPOConfig

JobConfig = (SFTConfig | DPOConfig | KTOConfig | OnlineDPOConfig | RewardConfig | PRMConfig | GRPOConfig | PPOConfig
             | DistillConfig)

CONFIGS: dict[str, type[JobConfig]] = {"sft": SFTConfig, "dpo": DPOConfig, "kto": KTOConfig,
                                       "online-dpo": OnlineDPOConfig, "reward": RewardConfig, "prm": PRMConfig,
                                       "grpo": GRPOConfig, "ppo": PPOConfig, "distill": DistillConfig}
