"""Row formats, chat rendering with assistant masks, packing, validation and splitting."""

from posttrain.data.dataset import (
                                    BatchPlan,
                                    DataReport,
                                    build_examples,
                                    eval_batches,
                                    holdout_split,
                                    load_messages,
                                    load_prompt_chats,
)
from posttrain.data.formats import detect_format, row_to_messages, row_to_prompt, validate_messages
from posttrain.data.packing import IGNORE, best_fit, collate, num_targets
from posttrain.data.preference import (
                                    Pair,
                                    PairPlan,
                                    PairReport,
                                    build_pairs,
                                    collate_pairs,
                                    pair_batches,
                                    parse_hh,
                                    row_to_pair,
)
from posttrain.data.readers import read_rows
from posttrain.data.render import Example, highlight, render_example, render_prompt

__all__ = ["IGNORE", "BatchPlan", "DataReport", "Example", "Pair", "PairPlan", "PairReport",
           "best_fit", "build_examples", "build_pairs", "collate", "collate_pairs", "detect_format",
           "eval_batches", "highlight", "holdout_split", "load_messages", "load_prompt_chats", "num_targets", "pair_batches", "parse_hh",
           "read_rows", "render_example", "render_prompt", "row_to_messages", "row_to_pair", "row_to_prompt", "validate_messages"]
