"""Arithmetic word problems with multi-digit numbers for the tool-use task: prompts for RL, a held-out test set and
calculator demonstrations for SFT.

A 135M model gets 347 * 28 - 1209 wrong on its own; with the calculator it only has to copy digits, so the gap
between the two is what tool use buys. Every problem is a left fold: step 1 is ``a op b``, each later step is the
previous result ``op`` a new operand, so a demonstration calls the calculator once per step on the digits the last
call returned. Operands have 2 to 4 digits, every intermediate result is a positive integer (division is exact)
and the question never states the answer. Everything follows from ``random.Random(seed)``.

Layer 6 (curate): may import posttrain.envs, errors and io; never config.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from posttrain.envs.schemas import CALCULATOR
from posttrain.errors import ConfigError
from posttrain.io import atomic_write_text

STEP_MIX = {1: 0.30, 2: 0.45, 3: 0.25}  # share of problems with 1, 2 and 3 operations
SPLITS = ("test", "demos", "train")  # generation order: the test set does not move when train grows
FILES = {"train": "train.jsonl", "test": "test.jsonl", "demos": "sft.jsonl"}
TOOL_NAME = CALCULATOR["function"]["name"]
ARG_NAME = CALCULATOR["function"]["parameters"]["required"][0]
MAX_TRIES = 1000  # numbers for one template: a prime before a division or a negative difference means try again

NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Priya", "Sam", "Elena", "Diego", "Noor", "Felix"]
CITIES = ["Leeds", "Lyon", "Porto", "Osaka", "Denver", "Tartu", "Cork", "Graz"]


class Template(NamedTuple):
    ops: str  # one character per step, applied left to right
    digits: tuple[tuple[int, int], ...]  # (fewest, most) digits of each operand, a then b, c, d
    text: str  # {a} {b} {c} {d} are the operands; other fields are drawn from ``words``
    words: dict[str, tuple[str, ...]] = {}


_ITEMS = ("pens", "notebooks", "batteries", "candles", "mugs")
TEMPLATES = [
    # one step
    Template("+", ((3, 4), (2, 4)), "{name}'s shop had {a} {item} in stock and a delivery brought {b} more. "
             "How many {item} does the shop have now?", {"item": _ITEMS}),
    Template("-", ((3, 4), (2, 3)), "A train left {city} with {a} passengers, and {b} of them got off at the first "
             "stop. How many passengers are still on the train?"),
    Template("*", ((2, 3), (2, 3)), "A farm has {a} rows of {crop} with {b} plants in each row. How many {crop} "
             "plants does the farm have?", {"crop": ("corn", "tomato", "cabbage", "sunflower", "bean")}),
    Template("/", ((3, 4), (2, 2)), "A warehouse packs {a} {item} into boxes of {b} each, with none left over. "
             "How many boxes does it fill?", {"item": _ITEMS}),
    Template("*", ((2, 4), (2, 2)), "{name} saves {a} dollars every month. How many dollars does {name} save in "
             "{b} months?"),
    Template("+", ((3, 4), (2, 4)), "A library owned {a} books and bought {b} new ones this year. How many books "
             "does the library own now?"),
    Template("-", ((3, 4), (2, 4)), "A water tank held {a} liters, and {b} liters were used to water the gardens. "
             "How many liters are left in the tank?"),
    Template("/", ((3, 4), (2, 2)), "A bakery baked {a} {pastry} and shared them equally among {b} cafes. "
             "How many {pastry} did each cafe get?", {"pastry": ("muffins", "rolls", "croissants", "bagels")}),
    # two steps
    Template("*-", ((2, 3), (2, 2), (2, 3)), "A warehouse received {a} crates with {b} bottles in each crate, and "
             "{c} bottles broke in transit. How many unbroken bottles did it receive?"),
    Template("*+", ((2, 3), (2, 3), (2, 3)), "A stadium has {a} sections of {b} seats plus {c} seats in the private "
             "boxes. How many seats does the stadium have?"),
    Template("+-", ((3, 4), (2, 4), (2, 4)), "{name} had {a} dollars in savings, earned {b} dollars more, and then "
             "spent {c} dollars on a bike. How many dollars does {name} have now?"),
    Template("-+", ((3, 3), (2, 3), (2, 3)), "A parking garage in {city} had {a} cars in the morning; {b} left at noon "
             "and {c} arrived in the afternoon. How many cars are in the garage now?"),
    Template("*/", ((2, 3), (2, 2), (2, 2)), "A factory makes {a} {widget} a day for {b} days and packs them all "
             "into cartons of {c} with none left over. How many cartons does it fill?",
             {"widget": ("lamps", "toasters", "kettles", "radios")}),
    Template("+/", ((3, 4), (3, 4), (2, 2)), "A school collected {a} {item} in the fall and {b} in the spring, and "
             "shared them equally among {c} classes. How many {item} did each class get?", {"item": _ITEMS}),
    Template("-/", ((3, 4), (2, 3), (2, 2)), "An orchard picked {a} apples, threw away {b} bruised ones and packed "
             "the rest into bags of {c} with none left over. How many bags did it fill?"),
    Template("/*", ((3, 4), (2, 2), (2, 3)), "A printer prints {a} pages in {b} minutes at a steady rate. "
             "How many pages does it print in {c} minutes?"),
    Template("*-", ((2, 2), (2, 2), (2, 3)), "A hotel in {city} has {a} floors with {b} rooms on each floor, and {c} "
             "rooms are booked tonight. How many rooms are free tonight?"),
    # three steps
    Template("*-/", ((2, 3), (2, 2), (2, 3), (2, 2)), "A warehouse holds {a} crates of {b} bottles each, ships out "
             "{c} bottles and packs the rest into boxes of {d} with none left over. How many boxes does it fill?"),
    Template("*+-", ((2, 3), (2, 2), (2, 3), (2, 3)), "A farm has {a} pens with {b} sheep in each pen, buys {c} more "
             "sheep and sells {d}. How many sheep does the farm have now?"),
    Template("+*-", ((2, 3), (2, 3), (2, 2), (2, 4)), "A shop sold {a} shirts on Monday and {b} on Tuesday at {c} "
             "dollars each, and paid {d} dollars in rent. How many dollars are left from the sales after rent?"),
    Template("*+/", ((2, 2), (2, 2), (2, 2), (2, 2)), "A train from {city} has {a} cars with {b} seats each plus {c} "
             "seats in the dining car, shared equally among {d} tour groups. How many seats does each group get?"),
    Template("-*+", ((3, 4), (2, 3), (2, 2), (2, 3)), "A fish hatchery raised {a} trout, released {b} of them into the "
             "river and sold the rest at {c} dollars each plus a {d} dollar delivery fee. How many dollars did it "
             "earn?"),
    Template("*-*", ((2, 3), (2, 2), (2, 3), (2, 2)), "A workshop builds {a} chairs a day for {b} days, {c} of them "
             "fail inspection, and each good chair sells for {d} dollars. How many dollars do the good chairs bring "
             "in?"),
    Template("+-/", ((3, 4), (2, 3), (2, 3), (2, 2)), "A library had {a} books, received {b} donated ones, discarded "
             "{c} damaged ones and spread the rest evenly over {d} shelves. How many books are on each shelf?"),
    Template("*/+", ((2, 2), (2, 3), (2, 2), (2, 3)), "A savings club of {a} members each pays {b} dollars, the total "
             "is split equally among {c} projects, and one project also gets a {d} dollar grant. How many dollars "
             "does that project get?"),
    Template("+/*", ((3, 4), (3, 4), (2, 2), (2, 2)), "Two trucks bring {a} and {b} kilograms of rice to a warehouse, "
             "where it is split equally into {c} sacks. How many kilograms are in {d} of those sacks?"),
]


@dataclass(frozen=True)
class Problem:
    prompt: str
    steps: tuple[str, ...]  # "347 * 28", then "9716 - 1209": each later step starts with the previous result
    results: tuple[int, ...]  # the result of every step, what the calculator returns

    @property
    def answer(self) -> str:
        return str(self.results[-1])

    def to_row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answer": self.answer, "steps": list(self.steps)}


def _number(rng: random.Random, lo: int, hi: int, below: int | None = None) -> int | None:
    """An operand of ``lo`` to ``hi`` digits (the digit count drawn first, so 2-digit operands are common), less than
    ``below`` when given; None when no such number exists."""
    counts = [d for d in range(lo, hi + 1) if below is None or 10 ** (d - 1) < below]
    if not counts:
        return None
    d = rng.choice(counts)
    top = 10 ** d - 1 if below is None else min(10 ** d - 1, below - 1)
    return rng.randint(10 ** (d - 1), top)


def _divisor(rng: random.Random, left: int, lo: int, hi: int) -> int | None:
    """A divisor of ``left`` with ``lo`` to ``hi`` digits and a quotient of at least 2, or None."""
    found = [d for d in range(10 ** (lo - 1), min(10 ** hi - 1, left // 2) + 1) if left % d == 0]
    return rng.choice(found) if found else None


def _apply(op: str, left: int, right: int) -> int:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    return left // right  # only reached with an exact divisor


def _numbers(rng: random.Random, t: Template) -> tuple[list[int], list[str], list[int]] | None:
    a = _number(rng, *t.digits[0])
    operands, steps, results, left = [a], [], [], a
    for op, (lo, hi) in zip(t.ops, t.digits[1:]):
        if op == "/":
            right = _divisor(rng, left, lo, hi)
        else:
            right = _number(rng, lo, hi, below=left if op == "-" else None)
        if right is None:
            return None
        steps.append(f"{left} {op} {right}")
        left = _apply(op, left, right)
        operands.append(right)
        results.append(left)
    return operands, steps, results


def make_problem(rng: random.Random, template: Template) -> Problem:
    """A problem from ``template`` with fresh numbers and words; the answer never appears in the question."""
    for _ in range(MAX_TRIES):
        drawn = _numbers(rng, template)
        if drawn is None:
            continue
        operands, steps, results = drawn
        words = {k: rng.choice(v) for k, v in template.words.items()}
        if "{name}" in template.text:
            words["name"] = rng.choice(NAMES)
        if "{city}" in template.text:
            words["city"] = rng.choice(CITIES)
        prompt = template.text.format(**dict(zip("abcd", operands)), **words)
        if re.search(rf"(?<!\d){results[-1]}(?!\d)", prompt):
            continue
        return Problem(prompt, tuple(steps), tuple(results))
    raise RuntimeError(f"no numbers fit the template {template.ops!r} in {MAX_TRIES} tries: {template.text[:60]!r}")


def step_counts(n: int, mix: dict[int, float] = STEP_MIX) -> dict[int, int]:
    """How many of ``n`` problems have each step count: the mix rounded, the remainder on the most common count."""
    counts = {k: round(n * share) for k, share in mix.items()}
    counts[max(mix, key=mix.get)] += n - sum(counts.values())
    return counts


def make_splits(train: int = 2000, test: int = 200, demos: int = 300, seed: int = 0) -> dict[str, list[Problem]]:
    """Problems for every split, no question text in two of them, each split in the step mix of ``STEP_MIX``."""
    sizes = {"train": train, "test": test, "demos": demos}
    for name, n in sizes.items():
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"arithmetic: {name} must be a whole number of problems, 0 or more; got {n!r}")
    rng = random.Random(seed)
    by_steps = {k: [t for t in TEMPLATES if len(t.ops) == k] for k in STEP_MIX}
    seen: set[str] = set()
    splits: dict[str, list[Problem]] = {}
    for name in SPLITS:
        plan = [k for k, c in step_counts(sizes[name]).items() for _ in range(c)]
        rng.shuffle(plan)
        problems = []
        for k in plan:
            for _ in range(MAX_TRIES):
                p = make_problem(rng, rng.choice(by_steps[k]))
                if p.prompt not in seen:
                    break
            else:
                raise RuntimeError(f"{MAX_TRIES} problems in a row repeat an earlier question")
            seen.add(p.prompt)
            problems.append(p)
        splits[name] = problems
    return {name: splits[name] for name in sizes}


def demo_row(problem: Problem) -> dict[str, Any]:
    """An SFT row in the OpenAI tool-call shape: one calculator call per step, its result, then the answer."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": problem.prompt}]
    for i, (step, result) in enumerate(zip(problem.steps, problem.results), start=1):
        call_id = f"call_{i}"
        messages.append({"role": "assistant", "content": "", "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": TOOL_NAME, "arguments": json.dumps({ARG_NAME: step})}}]})
        messages.append({"role": "tool", "tool_call_id": call_id, "name": TOOL_NAME, "content": str(result)})
    messages.append({"role": "assistant", "content": f"The answer is {problem.answer}."})
    return {"messages": messages, "tools": [CALCULATOR], "answer": problem.answer}


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_arithmetic(out_dir: str | Path, train: int = 2000, test: int = 200, demos: int = 300,
                     seed: int = 0) -> dict[str, int]:
    """Write train.jsonl and test.jsonl (prompt, answer, steps), sft.jsonl (calculator demonstrations) and
    meta.json into ``out_dir``, each file atomically; returns the rows written per split."""
    out = Path(out_dir)
    splits = make_splits(train=train, test=test, demos=demos, seed=seed)
    atomic_write_text(out / FILES["train"], _jsonl([p.to_row() for p in splits["train"]]))
    atomic_write_text(out / FILES["test"], _jsonl([p.to_row() for p in splits["test"]]))
    atomic_write_text(out / FILES["demos"], _jsonl([demo_row(p) for p in splits["demos"]]))
    sizes = {name: len(problems) for name, problems in splits.items()}
    meta = {"seed": seed, "sizes": sizes, "files": FILES, "step_mix": {str(k): v for k, v in STEP_MIX.items()},
            "step_counts": {name: {str(k): c for k, c in step_counts(n).items()} for name, n in sizes.items()},
            "templates": len(TEMPLATES)}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return sizes
