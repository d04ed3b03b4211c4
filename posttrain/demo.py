"""``make demo``: teach the embedded model to answer in a fixed JSON shape, and show before/after.

The task is generated here (no download): a sentence about a person goes in, a one-line JSON contact card
with the keys name, age, city, job comes out. The base model answers in prose or in a different shape;
after a few minutes of LoRA SFT on 2 CPU cores it answers with the exact card.
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
        card = {"name": f"{first} {last}", "age": rnd.randint(19, 78), "city": rnd.choice(CITIES), "job": rnd.choice(JOBS)}
        text = rnd.choice(TEMPLATES).format(name=card["name"], name_first=first, age=card["age"], city=card["city"],
                                            job=card["job"])
        rows.append({"messages": [{"role": "user", "content": INSTRUCTION + text},
                                  {"role": "assistant", "content": json.dumps(card)}]})
    return rows


def write_demo_data(folder: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    train, held = folder / "train.jsonl", folder / "eval.jsonl"
    for path, rows in ((train, make_rows(n_train, seed=1)), (held, make_rows(n_eval, seed=2))):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train, held


def exact_cards(outputs: list[str], chats: list[list[dict]]) -> float:
    """Fraction of outputs that parse as JSON and equal the reference card exactly."""
    hits = 0
    for out, chat in zip(outputs, chats):
        try:
            hits += json.loads(out) == json.loads(chat[-1]["content"])
        except (json.JSONDecodeError, TypeError):
            pass
    return hits / max(len(outputs), 1)


def main(output_dir: str = "demo-run", quick: bool = False) -> int:
    from rich.console import Console
    from rich.table import Table

    from posttrain.config import load_config
    from posttrain.data import eval_batches
    from posttrain.eval import heldout_loss
    from posttrain.pipeline import load_for_inference, prepare_data, run_sft
    from posttrain.rollout import generate

    out = Console(highlight=False)
    t0 = time.perf_counter()
    root = Path(output_dir)
    n_train, n_eval, n_gen = (48, 8, 4) if quick else (160, 40, 24)
    train, held = write_demo_data(root / "data", n_train, n_eval)
    overrides = [f"data.train={train}", f"data.eval={held}", f"output_dir={root / 'run'}", "data.max_seq_len=512",
                 "lora.r=16", "lora.alpha=32", "train.lr=1e-3", "train.micro_batch_size=2", "train.epochs=1",
                 "train.warmup_ratio=0.1", "train.log_every=2", "eval_samples=0"]
    if quick:
        overrides += ["train.max_steps=2"]
    cfg = load_config(None, overrides, method="sft")

    out.rule("posttrain demo: LoRA SFT of SmolLM2-135M-Instruct to answer with a JSON contact card")
    base = load_for_inference(cfg.model.name, None)
    _, held_ex, held_chats, _ = prepare_data(cfg.data, base.tokenizer)
    chats = held_chats[:n_gen]
    prompts = [c[:-1] for c in chats]
    before_out = generate(base.model, base.tokenizer, prompts, max_new_tokens=48)
    before_exact = exact_cards(before_out, chats)
    del base

    result = run_sft(cfg)
    tuned = load_for_inference(cfg.model.name, str(root / "run"))
    after_out = generate(tuned.model, tuned.tokenizer, prompts, max_new_tokens=48)
    after_exact = exact_cards(after_out, chats)
    after_loss = heldout_loss(tuned.model, eval_batches(held_ex, 8, tuned.tokenizer.pad_token_id))["eval/loss"]

    before_loss = result["eval_before"]["eval/loss"]
    table = Table(title="held-out (40 generated people the model never saw)" if not quick else "held-out")
    table.add_column("")
    table.add_column("before (base)", justify="right")
    table.add_column("after (LoRA)", justify="right")
    table.add_row("completion loss", f"{before_loss:.3f}", f"{after_loss:.3f}")
    table.add_row(f"exact JSON card ({len(chats)} prompts)", f"{before_exact:.0%}", f"{after_exact:.0%}")
    out.print(table)
    out.print(f"[bold]prompt:[/] {prompts[0][-1]['content']}")
    out.print(f"[bold]before:[/] {before_out[0]}")
    out.print(f"[bold]after:[/]  {after_out[0]}")
    drop = before_loss - after_loss
    out.print(f"held-out loss dropped by {drop:.3f} ({drop / before_loss:.0%}) in {time.perf_counter() - t0:.0f} s; "
              f"adapter in {root / 'run' / 'adapter'}", soft_wrap=True)
    out.print(f"try it: posttrain chat --adapter {root / 'run'}")
    (root / "demo_result.json").write_text(json.dumps(
        {"before_loss": before_loss, "after_loss": after_loss, "before_exact": before_exact,
         "after_exact": after_exact, "before": before_out, "after": after_out}, indent=2))
    return 0
