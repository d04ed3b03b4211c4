"""Row formats, chat rendering with assistant masks, packing, validation and splitting."""

from posttrain.data.dataset import BatchPlan, DataReport, build_examples, eval_batches, holdout_split, load_messages
from posttrain.data.formats import detect_format, row_to_messages, validate_messages
from posttrain.data.packing import IGNORE, best_fit, collate, num_targets
from posttrain.data.readers import DataError, read_rows
from posttrain.data.render import Example, TemplateError, highlight, render_example, render_prompt

__all__ = ["IGNORE", "BatchPlan", "DataError", "DataReport", "Example", "TemplateError", "best_fit",
           "build_examples", "collate", "detect_format", "eval_batches", "highlight", "holdout_split",
           "load_messages", "num_targets", "read_rows", "render_example", "render_prompt", "row_to_messages",
           "validate_messages"]
