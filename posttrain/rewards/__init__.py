"""Rewards: trained reward models (and, with online RL, verifiable reward functions)."""

from posttrain.rewards.model import Ensemble, RewardModel, load_reward

__all__ = ["Ensemble", "RewardModel", "load_reward"]
