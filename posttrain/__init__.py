"""posttrain: post-training for causal language models (SFT, preference learning, RL, evaluation, shipping)."""

__version__ = "0.1.0"
