"""The data layer: read rows, turn them into validated chats, render them with loss masks, pack, collate and
schedule them into batches, split off held-out sets, and read prompt files.

Modules: readers (files -> rows), formats (rows -> chat messages), render (chats -> tokens + mask), examples (SFT
data sets), pairs (preference data sets), prompts (prompt files), packing (best fit), collate (tensor batches and
their layouts), schedule (batches by optimizer step), split (held-out splits), mixing (mixing sources in), steps
(process-reward data: labelled steps, the token ending each, their batches), unpaired (KTO's labelled
completions).

Layer 1: may import only posttrain.errors, posttrain.io and posttrain.data itself (not config, models or engine).
"""

from posttrain.data.collate import (
    IGNORE,
    PAD_BRANCH,
    PairBatch,
    RolloutBatch,
    SFTBatch,
    UnpairedBatch,
    collate,
    collate_pairs,
    collate_rollouts,
    collate_unpaired,
    eval_batches,
    num_targets,
    pad_branch_rows,
    pair_batches,
)
from posttrain.data.examples import DataReport, build_examples, load_messages
from posttrain.data.formats import (
    Messages,
    conversation,
    detect_format,
    parse_hh,
    row_to_messages,
    row_to_prompt,
    validate_messages,
)
from posttrain.data.mixing import mix_counts, sample_rows
from posttrain.data.packing import best_fit, row_len, shared_prefix
from posttrain.data.pairs import Pair, PairReport, build_pairs, render_response, row_to_pair
from posttrain.data.prompts import load_prompt_chats, load_prompts
from posttrain.data.readers import read_rows
from posttrain.data.render import Example, has_chat_template, highlight, render_example, render_prompt
from posttrain.data.schedule import StepSchedule, pair_schedule, sft_schedule
from posttrain.data.split import held_out, holdout_split
from posttrain.data.steps import (
    StepBatch,
    StepExample,
    StepReport,
    build_steps,
    collate_steps,
    parse_label,
    render_steps,
    row_to_steps,
    step_batches,
    step_schedule,
)
from posttrain.data.unpaired import Unpaired, UnpairedReport, build_unpaired, row_to_unpaired, suggested_weights

__all__ = ["IGNORE", "PAD_BRANCH", "DataReport", "Example", "Messages", "Pair", "PairBatch", "PairReport",
           "RolloutBatch", "SFTBatch", "StepSchedule", "best_fit", "build_examples", "build_pairs", "collate",
           "collate_pairs", "collate_rollouts", "conversation", "detect_format", "eval_batches", "has_chat_template",
           "held_out", "highlight", "holdout_split", "load_messages", "load_prompt_chats", "load_prompts",
           "mix_counts", "num_targets", "pad_branch_rows", "pair_batches", "pair_schedule", "parse_hh", "read_rows",
           "render_example", "render_prompt", "render_response", "row_len", "row_to_messages", "row_to_pair",
           "row_to_prompt", "sample_rows", "sft_schedule", "shared_prefix", "validate_messages",
           "StepBatch", "StepExample", "StepReport", "build_steps", "collate_steps", "parse_label", "render_steps",
           "row_to_steps", "step_batches", "step_schedule",
           "Unpaired", "UnpairedBatch", "UnpairedReport", "build_unpaired", "collate_unpaired", "row_to_unpaired",
           "suggested_weights"]
