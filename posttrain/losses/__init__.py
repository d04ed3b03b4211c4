"""Pure loss functions on tensors, each cited and tested against numbers worked by hand.

Layer 0: imports only torch (and the standard library); nothing of posttrain."""

from posttrain.losses.cross_entropy import (
                                            linear_cross_entropy_sum,
                                            linear_kl_sum,
                                            target_logps,
                                            token_cross_entropy_sum,
                                            token_kl_sum,
)
from posttrain.losses.distill import DIVERGENCES, divergence_sum, linear_divergence_sum, token_divergence
from posttrain.losses.kto import kto_loss, kto_z0, mismatched_order
from posttrain.losses.preference import (
                                            PREFERENCE_LOSSES,
                                            PairLogps,
                                            PreferenceLoss,
                                            PreferenceParams,
                                            bradley_terry,
                                            cpo,
                                            dpo_sigmoid,
                                            ipo,
                                            ipo_per_token,
                                            orpo,
                                            rpo,
                                            simpo,
)
from posttrain.losses.process import NEUTRAL_TARGETS, counted_steps, step_bce

__all__ = ["DIVERGENCES", "divergence_sum", "linear_divergence_sum", "token_divergence",
           "NEUTRAL_TARGETS", "PREFERENCE_LOSSES", "PairLogps", "PreferenceLoss", "PreferenceParams", "bradley_terry",
           "counted_steps", "cpo", "dpo_sigmoid", "ipo", "ipo_per_token", "kto_loss", "kto_z0",
           "linear_cross_entropy_sum", "linear_kl_sum", "mismatched_order", "orpo", "rpo", "simpo", "step_bce",
           "target_logps", "token_cross_entropy_sum", "token_kl_sum"]
