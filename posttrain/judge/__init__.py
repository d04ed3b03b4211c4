"""AI judges: pairwise judging in both orders, and Constitutional AI critique/revise data."""

from posttrain.judge.pairwise import JUDGE_TEMPLATE, Judge, ModelJudge, PairVerdict, both_orders, win_rate

__all__ = ["JUDGE_TEMPLATE", "Judge", "ModelJudge", "PairVerdict", "both_orders", "win_rate"]
