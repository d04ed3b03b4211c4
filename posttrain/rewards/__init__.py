"""Rewards: trained reward models (outcome: one score per response; process: one per step), and verifiable reward
functions for online RL.

Layer 4: may import runs, models, data, io and errors; never methods or config."""

from posttrain.rewards.functions import REWARD_FUNCTIONS, Combined, call_reward, resolve_reward
from posttrain.rewards.model import Ensemble, RewardModel, load_reward
from posttrain.rewards.process import ProcessRewardModel, load_prm

__all__ = ["REWARD_FUNCTIONS", "Combined", "Ensemble", "ProcessRewardModel", "RewardModel", "call_reward",
           "load_prm", "load_reward", "resolve_reward"]
