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


def make_pairs(n: int, seed: int) -> list[dict]:
    """House-style pairs SFT never showed: the same card with its keys in alphabetical order (chosen) or in the
    SFT order (rejected). DPO alone has to move the model, and the change is visible in its answers."""
    out = []
    for row in make_rows(n, seed):
        card = json.loads(row["messages"][1]["content"])
        out.append({"prompt": row["messages"][0]["content"], "chosen": json.dumps(dict(sorted(card.items()))),
                    "rejected": json.dumps(card)})
    return out


def write_demo_pairs(folder: Path, n_train: int, n_eval: int) -> tuple[Path, Path]:
    train, held = folder / "pairs-train.jsonl", folder / "pairs-eval.jsonl"
    for path, rows in ((train, make_pairs(n_train, seed=3)), (held, make_pairs(n_eval, seed=4))):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train, held


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


def house_style(outputs: list[str]) -> float:
    """Fraction of outputs that are JSON objects with their keys in alphabetical order."""
    hits = 0
    for out in outputs:
        try:
            card = json.loads(out)
            hits += isinstance(card, dict) and len(card) > 1 and list(card) == sorted(card)
        except json.JSONDecodeError:
            pass
    return hits / max(len(outputs), 1)


def prefers_chosen(model, pairs, pad_id: int) -> float:
    """Fraction of pairs whose chosen response the model gives a higher log-probability than the rejected one."""
    import torch

    from posttrain.data import pair_batches
    from posttrain.methods import sequence_logps

    wins = 0
    with torch.no_grad():
        for b in pair_batches(pairs, 8, pad_id):
            logp = sequence_logps(model, b)[0]
            wins += int((logp[0::2] > logp[1::2]).sum())
    return wins / len(pairs)


def main(output_dir: str = "demo-run", quick: bool = False) -> int:
    from rich.console import Console
    from rich.table import Table

    from posttrain.config import load_config
    from posttrain.data import build_pairs, eval_batches
    from posttrain.eval import heldout_loss
    from posttrain.pipeline import load_for_inference, prepare_data, run_dpo, run_sft
    from posttrain.rollout import generate

    out = Console(highlight=False)
    t0 = time.perf_counter()
    root = Path(output_dir)
    n_train, n_eval, n_gen = (48, 8, 4) if quick else (160, 40, 24)
    n_pairs, n_pairs_eval = (16, 8) if quick else (32, 24)
    train, held = write_demo_data(root / "data", n_train, n_eval)
    overrides = [f"data.train={train}", f"data.eval={held}", f"output_dir={root / 'run'}", "data.max_seq_len=512",
                 "lora.r=16", "lora.alpha=32", "train.lr=1e-3", "train.micro_batch_size=2", "train.epochs=1",
                 "train.warmup_ratio=0.1", "train.log_every=2", "eval_samples=0"]
    if quick:
        overrides += ["train.max_steps=2"]
    cfg = load_config(None, overrides, method="sft")

    out.rule("posttrain demo, stage 1: LoRA SFT of SmolLM2-135M-Instruct to answer with a JSON contact card")
    base = load_for_inference(cfg.model.name, None)
    _, held_ex, held_chats, _ = prepare_data(cfg.data, base.tokenizer)
    chats = held_chats[:n_gen]
    prompts = [c[:-1] for c in chats]
    before_out = generate(base.model, base.tokenizer, prompts, max_new_tokens=48)
    del base

    result = run_sft(cfg)
    tuned = load_for_inference(cfg.model.name, str(root / "run"))
    sft_out = generate(tuned.model, tuned.tokenizer, prompts, max_new_tokens=48)
    after_loss = heldout_loss(tuned.model, eval_batches(held_ex, 8, tuned.tokenizer.pad_token_id))["eval/loss"]
    before_loss = result["eval_before"]["eval/loss"]

    out.rule("stage 2: LoRA DPO on top of the SFT adapter, to a house style SFT never showed (sorted keys)")
    ptrain, pheld = write_demo_pairs(root / "data", n_pairs, n_pairs_eval)
    pad = tuned.tokenizer.pad_token_id
    held_pairs = build_pairs(str(pheld), tuned.tokenizer, max_seq_len=256)[0]
    sft_pref = prefers_chosen(tuned.model, held_pairs, pad)
    del tuned
    dpo_overrides = [f"model.init_adapter={root / 'run'}", f"data.train={ptrain}", f"data.eval={pheld}",
                     f"output_dir={root / 'dpo'}", "data.max_seq_len=256", "train.lr=3e-4", "train.micro_batch_size=2",
                     # Plain DPO at this setting flips the preference but lowers the likelihood of ending the
                     # card (both log-probs fall), and answers run on; RPO's NLL on the chosen card keeps it.
                     "train.epochs=1", "train.warmup_ratio=0.1", "train.log_every=2", "dpo.beta=0.1",
                     "dpo.loss=rpo", "dpo.rpo_alpha=1.0", "dpo.precompute_ref=true",
                     "data.packing=false"]  # one pair per row: 16 steps, not the 4 that packing would leave
    if quick:
        dpo_overrides += ["train.max_steps=2"]
    dres = run_dpo(load_config(None, dpo_overrides, method="dpo"))
    dpo = load_for_inference(None, str(root / "dpo"))
    dpo_out = generate(dpo.model, dpo.tokenizer, prompts, max_new_tokens=48)
    dpo_pref = prefers_chosen(dpo.model, held_pairs, pad)

    table = Table(title="held-out (people and pairs the model never saw)")
    for col, just in (("", "left"), ("base", "right"), ("+ SFT", "right"), ("+ SFT + DPO", "right")):
        table.add_column(col, justify=just)
    table.add_row("completion loss", f"{before_loss:.3f}", f"{after_loss:.3f}", "")
    table.add_row(f"exact JSON card ({len(chats)} prompts)", f"{exact_cards(before_out, chats):.0%}",
                  f"{exact_cards(sft_out, chats):.0%}", f"{exact_cards(dpo_out, chats):.0%}")
    table.add_row("answers with sorted keys", f"{house_style(before_out):.0%}", f"{house_style(sft_out):.0%}",
                  f"{house_style(dpo_out):.0%}")
    table.add_row(f"prefers chosen ({len(held_pairs)} pairs, log-prob)", "", f"{sft_pref:.0%}", f"{dpo_pref:.0%}")
    acc = dres["eval_after"]["eval/accuracy"] if dres["eval_after"] else float("nan")
    table.add_row("DPO preference accuracy (reward margin > 0)", "", "", f"{acc:.0%}")
    out.print(table)
    out.print(f"[bold]prompt:[/] {prompts[0][-1]['content']}")
    out.print(f"[bold]base:[/]  {before_out[0]}")
    out.print(f"[bold]SFT:[/]   {sft_out[0]}")
    out.print(f"[bold]DPO:[/]   {dpo_out[0]}")
    drop = before_loss - after_loss
    out.print(f"held-out loss dropped by {drop:.3f} ({drop / before_loss:.0%}); total {time.perf_counter() - t0:.0f} s; "
              f"adapters in {root / 'run' / 'adapter'} (SFT) and {root / 'dpo' / 'adapter'} (DPO)", soft_wrap=True)
    out.print("The DPO stage uses dpo.loss=rpo: DPO plus the chosen answers' NLL. Plain DPO (dpo.loss=dpo) flips "
              "the preference too but lowers both log-probs, and answers run on past the card; logps/chosen in "
              f"{root / 'dpo' / 'metrics.jsonl'} shows which happened.", soft_wrap=True)
    out.print(f"try it: posttrain chat --adapter {root / 'dpo'}")
    (root / "demo_result.json").write_text(json.dumps(
        {"before_loss": before_loss, "after_loss": after_loss, "before_exact": exact_cards(before_out, chats),
         "after_exact": exact_cards(sft_out, chats), "dpo_exact": exact_cards(dpo_out, chats),
         "sft_sorted": house_style(sft_out), "dpo_sorted": house_style(dpo_out), "sft_prefers_chosen": sft_pref,
         "dpo_prefers_chosen": dpo_pref, "dpo_accuracy": acc,
         "dpo_margin": dres["eval_after"]["eval/rewards/margin"] if dres["eval_after"] else None, "before": before_out, "after": sft_out,
         "dpo": dpo_out}, indent=2))
    return 0
