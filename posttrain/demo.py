"""``make demo``: the eval-first workflow on the embedded model, end to end, in a few minutes on 2 CPU cores.

The task is generated here (no download): a sentence about a person goes in, a one-line JSON contact card
with the keys name, age, city, job comes out. The demo writes its data and a workflow file, then runs
``posttrain run``: a held-out set fixed and hashed first; the prompt-only baseline (the base model told the format
in a system prompt); LoRA SFT; a gate (cards must beat the baseline, general knowledge must not fall much);
DPO to a house style SFT never showed (sorted keys); a second gate; export; report.html with before/after.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

FIRST = ["Maria", "John", "Aiko", "Pedro", "Fatima", "Lars", "Chen", "Olivia", "Kwame", "Sofia", "Ivan", "Priya",
         "Lucas", "Amara", "Noah", "Elena", "Omar", "Hana", "Diego", "Greta", "Yusuf", "Mei", "Tomas", "Zara"]
LAST = ["Lopez", "Smith", "Tanaka", "Silva", "Khan", "Berg", "Wang", "Brown", "Mensah", "Rossi", "Petrov", "Patel",
        "Martin", "Okafor", "Keller", "Novak", "Haddad", "Kim", "Garcia", "Larsen", "Demir", "Liu", "Horvat", "Ali"]
CITIES = ["Valencia", "Chicago", "Osaka", "Lisbon", "Lahore", "Oslo", "Shanghai", "Leeds", "Accra", "Turin",
          "Kazan", "Pune", "Lyon", "Lagos", "Zurich", "Prague", "Beirut", "Busan", "Bogota", "Bergen"]
JOBS = ["nurse", "teacher", "pilot", "baker", "engineer", "chemist", "carpenter", "lawyer", "farmer", "designer",
        "plumber", "dentist", "librarian", "chef", "architect", "journalist"]
TEMPLATES = [
    "{name}, {age}, lives in {city} and works as a {job}.",
    "Meet {name}: a {age}-year-old {job} from {city}.",
    "{name} is a {job} based in {city}. {name_first} is {age} years old.",
    "Our new neighbour {name} ({age}) moved here from {city}; {name_first} is a {job}.",
    "At {age}, {name} already runs a small business in {city} as a {job}.",
    "The {job} {name}, aged {age}, was born and raised in {city}.",
]
INSTRUCTION = "Extract the contact card from this text:\n"


def make_rows(n: int, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        first, last = rnd.choice(FIRST), rnd.choice(LAST)
        card = {"name": f"{first} {last}", "age": rnd.randint(19, 78), "city": rnd.choice(CITIES),
                "job": rnd.choice(JOBS)}
        text = rnd.choice(TEMPLATES).format(name=card["name"], name_first=first, age=card["age"], city=card["city"],
                                            job=card["job"])
        rows.append({"messages": [{"role": "user", "content": INSTRUCTION + text},
                                  {"role": "assistant", "content": json.dumps(card)}]})
    return rows


def make_pairs(n: int, seed: int) -> list[dict]:
    """House-style pairs SFT never showed: the same card with its keys in alphabetical order (chosen) or in the
    SFT order (rejected). DPO alone has to move the model, and the change is visible in its answers."""
    out = []
    for row in make_rows(n, seed):
        card = json.loads(row["messages"][1]["content"])
        out.append({"prompt": row["messages"][0]["content"], "chosen": json.dumps(dict(sorted(card.items()))),
                    "rejected": json.dumps(card)})
    return out


# Out-of-domain checks the task never trains on: they show forgetting (or its absence) next to the in-domain lift.
GENERAL_QA = [
    ("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Italy?", "Rome"), ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"), ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"), ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("What is the chemical symbol for water?", "H2O"), ("How many days are in a week?", "seven"),
    ("What is the freezing point of water in degrees Celsius?", "0"), ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the opposite of hot?", "cold"), ("What colour is the sky on a clear day?", "blue"),
    ("Which ocean is the largest?", "Pacific"), ("What is 2 plus 2?", "4"),
    ("What do bees make?", "honey"), ("Which animal is known as the king of the jungle?", "lion"),
    ("What is the boiling point of water in degrees Celsius?", "100"), ("How many legs does a spider have?", "eight"),
]
MULTIPLE_CHOICE = [
    ("What is the capital of France?", ["Berlin", "Paris", "Madrid", "Rome"], 1),
    ("Which planet is closest to the Sun?", ["Venus", "Earth", "Mercury", "Mars"], 2),
    ("How many continents are there?", ["Five", "Six", "Seven", "Eight"], 2),
    ("What is H2O commonly called?", ["Salt", "Water", "Oxygen", "Sugar"], 1),
    ("Which animal is a mammal?", ["Shark", "Eagle", "Dolphin", "Frog"], 2),
    ("What is 10 times 10?", ["100", "20", "1000", "110"], 0),
    ("Which colour do you get by mixing blue and yellow?", ["Purple", "Green", "Orange", "Red"], 1),
    ("Which is the largest ocean?", ["Atlantic", "Indian", "Arctic", "Pacific"], 3),
    ("Who painted the Mona Lisa?", ["Picasso", "Van Gogh", "Leonardo da Vinci", "Monet"], 2),
    ("What is the freezing point of water in Celsius?", ["0", "32", "100", "-10"], 0),
    ("Which gas do humans need to breathe?", ["Nitrogen", "Oxygen", "Helium", "Hydrogen"], 1),
    ("How many hours are in a day?", ["12", "24", "36", "48"], 1),
]
UNANSWERABLE = [
    "What did I have for breakfast this morning?", "What is the name of my best friend?",
    "What number am I thinking of right now?", "What will the weather be in my town exactly one year from today?",
    "What is written on the note in my pocket?", "How much money is in my bank account?",
    "What colour is the car parked outside my house?", "What time did I wake up today?",
]
# Replay prompts (general requests, none of them in the checks above): the base model's own answers to them are
# mixed into SFT so that the card task does not overwrite how it answers everything else.
REPLAY_PROMPTS = [
    "Give me three tips for sleeping better.", "Explain what a rainbow is in two sentences.",
    "Write a short thank-you note to a colleague.", "What are the benefits of drinking water?",
    "Describe a cat to someone who has never seen one.", "How do I boil an egg?",
    "Suggest a name for a small bakery.", "Why do leaves change colour in autumn?",
    "List four fruits that are rich in vitamin C.", "What is the difference between weather and climate?",
    "Write a haiku about the sea.", "How can I save money on groceries?",
    "Explain what a computer virus is.", "Give an example of a renewable energy source and explain it.",
    "What should I pack for a weekend hiking trip?", "Summarise the story of Cinderella in three sentences.",
    "How does a bicycle work?", "What is photosynthesis?", "Recommend a good habit for learning a language.",
    "Explain why exercise is good for the heart.", "What is the tallest mountain in the world?",
    "Who was Albert Einstein?", "How many minutes are in an hour?", "What is the largest desert on Earth?",
    "Translate 'good morning' into Spanish.", "What does a librarian do?", "How do airplanes stay in the air?",
    "Name three famous painters.", "What is the main ingredient of guacamole?", "Why is the ocean salty?",
    "What is the capital of Canada?", "Which continent is Egypt in?",
]
SYSTEM_PROMPT = "Extract the person's details and answer with one line of JSON with the keys name, age, city, job."


def write_demo_files(root: Path, quick: bool) -> Path:
    """The demo's data (all generated or listed here) and its workflow file; returns the workflow path."""
    import yaml

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    n_cards, n_pairs, n_pairs_eval = (60, 8, 8) if quick else (200, 32, 24)

    def write(name: str, rows: list[dict]) -> str:
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(data / name)

    cards = write("cards.jsonl", make_rows(n_cards, seed=1))
    pairs, pairs_eval = (write(f"pairs-{k}.jsonl", make_pairs(n, seed)) for k, n, seed in
                         (("train", n_pairs, 3), ("eval", n_pairs_eval, 4)))
    general = write("general.jsonl", [{"prompt": q, "completion": a} for q, a in GENERAL_QA])
    mc = write("multiple-choice.jsonl", [{"question": q, "choices": c, "answer": a} for q, c, a in MULTIPLE_CHOICE])
    abstain = write("unanswerable.jsonl", [{"prompt": p, "answerable": False} for p in UNANSWERABLE])
    replay = write("replay-prompts.jsonl", [{"prompt": p} for p in REPLAY_PROMPTS])
    # --quick (the smoke test): every stage and suite runs, on a few rows and steps
    limit = 4 if quick else 24
    sft_steps = {"max_steps": 6} if quick else {"epochs": 1}
    dpo_steps = {"max_steps": 2} if quick else {"epochs": 1}
    replay_cfg = {"prompts": replay, "ratio": 0.1, "max_new_tokens": 24} if quick else \
        {"prompts": replay, "ratio": 0.2, "max_new_tokens": 128}
    workflow = {
        "name": "posttrain demo: JSON contact cards",
        "output_dir": str(root),
        "eval_set": {"split": cards, "fraction": 0.2, "seed": 0},
        "baseline": {"system_prompt": SYSTEM_PROMPT},
        "evals": {
            "cards": {"kind": "generation", "data": "${eval_set}", "limit": limit,
                      "options": {"scorer": "json_exact", "max_new_tokens": 48}},
            "cards_loss": {"kind": "loss", "data": "${eval_set}"},
            "house_style": {"kind": "preference", "data": pairs_eval},
            "general": {"kind": "generation", "data": general, "limit": limit,
                        "options": {"scorer": "contains", "max_new_tokens": 32}},
            "calibration": {"kind": "multiple_choice", "data": mc},
            "abstention": {"kind": "abstention", "data": abstain, "limit": limit,
                           "options": {"max_new_tokens": 32}},
        },
        "stages": [
            # Plain SFT on cards answers everything with a card: general questions 75% -> 30% right (measured), and
            # the gate below blocks it. Replaying the base model's own answers to general prompts (20% of the set)
            # keeps them at 75% while the cards still reach ~80-100% exact.
            {"name": "sft", "train": "sft", "config": {
                "data": {"train": "${train_set}", "eval": "${eval_set}", "max_seq_len": 512,
                         "replay": replay_cfg},
                "lora": {"r": 16, "alpha": 32}, "eval_samples": 0,
                "train": {"lr": 1e-3, "micro_batch_size": 2, "warmup_ratio": 0.1, "log_every": 4, **sft_steps}}},
            {"name": "gate_sft", "gate": {"candidate": "sft", "baseline": "baseline", "rules": [
                {"metric": "cards/json_exact", "min_lift": 0.05},
                {"metric": "cards_loss/loss", "min_relative_lift": 0.05},
                {"metric": "general/contains", "max_regression": 0.1}]}},
            # Plain DPO at this setting flips the preference but lowers the likelihood of ending the card (both
            # log-probs fall), and answers run on; RPO's NLL on the chosen card keeps it.
            {"name": "dpo", "train": "dpo", "init_from": "sft", "config": {
                "data": {"train": pairs, "eval": pairs_eval, "max_seq_len": 256,
                         "packing": False},  # one pair per row: 16 steps, not the 4 that packing would leave
                "dpo": {"beta": 0.1, "loss": "rpo", "rpo_alpha": 1.0, "precompute_ref": True},
                "train": {"lr": 3e-4, "micro_batch_size": 2, "warmup_ratio": 0.1, "log_every": 4,
                          **dpo_steps}}},
            {"name": "gate_dpo", "gate": {"candidate": "dpo", "baseline": "sft", "rules": [
                {"metric": "house_style/accuracy", "min_lift": 0.2},
                {"metric": "cards/json_exact", "max_regression": 0.1}]}},
            {"name": "export", "export": "dpo"},
        ],
    }
    path = root / "workflow.yaml"
    path.write_text("# written by `posttrain demo`; run it again with `posttrain run " + str(path) + "`\n"
                    + yaml.safe_dump(workflow, sort_keys=False, width=110))
    return path


def main(output_dir: str = "demo-run", quick: bool = False) -> int:
    from rich.console import Console

    from posttrain.workflow import run_workflow

    out = Console(highlight=False)
    t0 = time.perf_counter()
    root = Path(output_dir)
    path = write_demo_files(root, quick)
    out.rule("posttrain demo: eval set -> prompt-only baseline -> LoRA SFT -> gate -> DPO -> gate -> export")
    code = run_workflow(str(path))
    evals = {}
    for label in ("baseline", "sft", "dpo"):
        try:
            evals[label] = json.loads((root / "evals" / f"{label}.json").read_text())["cards"]
        except (OSError, KeyError):
            pass
    if "baseline" in evals:
        first = evals["baseline"]["details"][0]
        out.print(f"[bold]prompt:[/] {first.get('prompt', '')}", soft_wrap=True)
        for label, res in evals.items():
            out.print(f"[bold]{label}:[/] {res['details'][0].get('output', '')}", soft_wrap=True)
    out.print(f"total {time.perf_counter() - t0:.0f} s; report: {root / 'report.html'} (open it in a browser); "
              f"workflow file: {path}", soft_wrap=True)
    if (root / "dpo" / "adapter").exists():
        out.print(f"try it: posttrain chat --adapter {root / 'dpo'}")
    return code
