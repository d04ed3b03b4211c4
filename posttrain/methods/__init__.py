"""Training methods: each turns a batch into a summed loss and its metrics."""

from posttrain.methods.sft import SFT, completion_loss_sum, unwrap

__all__ = ["SFT", "completion_loss_sum", "unwrap"]
