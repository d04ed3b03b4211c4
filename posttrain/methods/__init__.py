"""Training methods: each turns a batch into a summed loss and its metrics."""

from posttrain.methods.preference import (
                                          AdapterOffReference,
                                          FrozenCopyReference,
                                          PrecomputedReference,
                                          Preference,
                                          precompute_reference,
                                          preference_eval,
                                          sequence_logps,
)
from posttrain.methods.sft import SFT, completion_loss_sum, unwrap

__all__ = ["AdapterOffReference", "FrozenCopyReference", "PrecomputedReference", "Preference", "SFT",
           "completion_loss_sum", "precompute_reference", "preference_eval", "sequence_logps", "unwrap"]
