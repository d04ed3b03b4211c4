"""Generation from the current policy."""

from posttrain.rollout.generate import generate, stop_token_ids

__all__ = ["generate", "stop_token_ids"]
