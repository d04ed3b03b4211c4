"""Evaluation suites."""

from posttrain.eval.heldout import heldout_loss, sample_generations

__all__ = ["heldout_loss", "sample_generations"]
