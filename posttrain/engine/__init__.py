"""The training loop, schedule, checkpoints and metrics logging."""

from posttrain.engine.checkpoint import atomic_dir, atomic_write_bytes, atomic_write_text, list_checkpoints
from posttrain.engine.logging import MetricsLog, console, read_metrics
from posttrain.engine.loop import LoopOptions, train_loop
from posttrain.engine.schedule import warmup_cosine

__all__ = ["LoopOptions", "MetricsLog", "atomic_dir", "atomic_write_bytes", "atomic_write_text", "console", "list_checkpoints",
           "read_metrics", "train_loop", "warmup_cosine"]
