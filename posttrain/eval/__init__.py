"""Evaluation suites and gates.

Light on purpose: the suites (``posttrain.eval.suites`` and its kind modules) pull in rewards, rollouts and judges,
so they are imported from their own modules, never from here.
"""

from posttrain.eval.gate import Rule, check_gate, gate_table
from posttrain.eval.heldout import heldout_loss, sample_generations

__all__ = ["Rule", "check_gate", "gate_table", "heldout_loss", "sample_generations"]
