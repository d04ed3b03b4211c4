"""AI judges: pairwise judging in both orders, and Constitutional AI critique/revise data.

Layer 4: may import data, models, rollout, engine, io, errors; never methods or config."""

from posttrain.judge.cai import read_prompts, rl_cai, sl_cai
from posttrain.judge.constitution import DEFAULT_CONSTITUTION, Principle, load_constitution
from posttrain.judge.pairwise import (
                                      JUDGE_TEMPLATE,
                                      CalibratedJudge,
                                      Judge,
                                      ModelJudge,
                                      PairVerdict,
                                      both_orders,
                                      win_rate,
)

__all__ = ["DEFAULT_CONSTITUTION", "JUDGE_TEMPLATE", "CalibratedJudge", "Judge", "ModelJudge", "PairVerdict",
           "Principle", "both_orders", "load_constitution", "read_prompts", "rl_cai", "sl_cai", "win_rate"]
