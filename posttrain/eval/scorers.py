"""Generation scorers: (output, reference, options) -> score in [0, 1], by name in ``SCORERS``.

Layer 6 (eval): imports rewards.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

from posttrain.rewards.functions import final_number


def _json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text.strip())
    except (json.JSONDecodeError, ValueError):
        return False, None


def score_exact(output: str, reference: str, options: dict) -> float:
    return float(output.strip() == reference.strip())


def score_json_exact(output: str, reference: str, options: dict) -> float:
    (ok_out, got), (ok_ref, want) = _json(output), _json(reference)
    return float(ok_out and ok_ref and got == want)


def score_json_valid(output: str, reference: str, options: dict) -> float:
    return float(_json(output)[0])


def score_regex(output: str, reference: str, options: dict) -> float:
    return float(re.search(options["pattern"], output) is not None)


def score_number(output: str, reference: str, options: dict) -> float:
    """The output's final number (its ``####`` line, else its last number) equals the reference's."""
    got, want = final_number(output, strict=False), final_number(reference, strict=False)
    return float(got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9))


def score_contains(output: str, reference: str, options: dict) -> float:
    return float(reference.strip().lower() in output.lower())


SCORERS: dict[str, Callable[[str, str, dict], float]] = {
    "exact": score_exact, "json_exact": score_json_exact, "json_valid": score_json_valid, "regex": score_regex,
    "number": score_number, "contains": score_contains,
}
NO_REFERENCE = {"json_valid", "regex"}  # scorers that judge the output alone

# where read_prompts looks, in order, for a prompt row's reference answer
REFERENCE_FIELDS = ("completion", "answer", "reference", "output")
