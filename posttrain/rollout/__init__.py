"""Generation from the current policy: sampling, chat-to-text generation, and the rollout schedule that the online
RL methods hand to the loop.

Layer 3: may import models, data, io and errors; never methods or config."""

from posttrain.rollout.generate import generate, stop_token_ids

__all__ = ["generate", "stop_token_ids"]
