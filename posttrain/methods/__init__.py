"""Training methods, one file each (sft, dpo, kto, reward, grpo, ppo): each turns a batch into a summed loss and its
metrics. Layer 5: may import layers 0-4 (losses, data, models, engine, rollout, rewards, ...), never config."""

from posttrain.methods.dpo import PreferenceMethod, precompute_reference, preference_eval
from posttrain.methods.sft import SFT, completion_loss_sum

__all__ = ["SFT", "PreferenceMethod", "completion_loss_sum", "precompute_reference", "preference_eval"]
