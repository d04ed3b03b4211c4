"""The training loop, schedule, checkpoints and metrics logging.

Layer 3: the loop knows nothing of methods, data or configs; it imports io, errors and models (decoder layers,
for FSDP2) only."""

from posttrain.engine.checkpoint import list_checkpoints
from posttrain.engine.logging import MetricsLog, console, read_metrics
from posttrain.engine.loop import LoopOptions, train_loop
from posttrain.engine.schedule import warmup_cosine

__all__ = ["LoopOptions", "MetricsLog", "console", "list_checkpoints",
           "read_metrics", "train_loop", "warmup_cosine"]
