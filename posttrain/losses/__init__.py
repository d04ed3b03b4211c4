"""Pure loss functions on tensors (they import only torch)."""

from posttrain.losses.cross_entropy import linear_cross_entropy_sum, token_cross_entropy_sum

__all__ = ["linear_cross_entropy_sum", "token_cross_entropy_sum"]
