"""Evaluation suites and gates."""

from posttrain.eval.gate import Rule, check_gate, gate_table
from posttrain.eval.heldout import heldout_loss, sample_generations
from posttrain.eval.suites import (
                                   ABSTAIN_PATTERNS,
                                   SCORERS,
                                   SUITE_OPTIONS,
                                   SUITES,
                                   SuiteResult,
                                   abstains,
                                   expected_calibration_error,
                                   read_prompts,
                                   run_suite,
)

__all__ = ["ABSTAIN_PATTERNS", "SCORERS", "SUITES", "SUITE_OPTIONS", "Rule", "SuiteResult", "abstains",
           "check_gate", "expected_calibration_error", "gate_table", "heldout_loss", "read_prompts", "run_suite",
           "sample_generations"]
