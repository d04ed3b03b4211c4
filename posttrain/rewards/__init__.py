"""Rewards: trained reward models, and verifiable reward functions for online RL.

Layer 4: may import runs, models, data, io and errors; never methods or config."""

from posttrain.rewards.functions import REWARD_FUNCTIONS, Combined, call_reward, resolve_reward
from posttrain.rewards.model import Ensemble, RewardModel, load_reward

__all__ = ["REWARD_FUNCTIONS", "Combined", "Ensemble", "RewardModel", "call_reward", "load_reward",
           "resolve_reward"]
