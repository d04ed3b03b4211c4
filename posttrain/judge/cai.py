"""Constitutional AI data (Bai et al., 2022, "Constitutional AI: Harmlessness from AI Feedback").

SL-CAI: the model answers, critiques its answer against a principle, and rewrites it; (prompt, rewrite) is an
SFT row. RL-CAI (RLAIF): two sampled answers per prompt, judged against a principle's criterion in both orders;
pairs whose verdicts agree become preference rows, ties and order-dependent (inconsistent) verdicts are dropped
and counted. Every row carries its provenance, so a data set can be traced back to the model, principle and
sampling settings that made it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from posttrain.data import load_prompt_chats
from posttrain.data.formats import Messages
from posttrain.errors import DataError
from posttrain.judge.constitution import Principle
from posttrain.judge.pairwise import CalibratedJudge, Judge, both_orders
from posttrain.rollout import generate


def read_prompts(path: str | Path) -> list[str]:
    """The last user turn of every prompt in a file (see ``posttrain.data.load_prompt_chats`` for the row formats;
    a .txt file is one prompt per line)."""
    chats = load_prompt_chats(str(path))
    if not chats:
        raise DataError(path, None, None, "file has no prompts")
    return [chat[-1]["content"].strip() for _, chat in chats]


def _pick(principles: list[Principle], n: int, seed: int) -> list[Principle]:
    if not principles:
        raise ValueError("the constitution has no principles")
    rng = random.Random(seed)  # its own generator: the choice does not depend on torch's sampling state
    return [rng.choice(principles) for _ in range(n)]


def sl_cai(model: torch.nn.Module, tokenizer, prompts: list[str], principles: list[Principle], *, seed: int = 0,
           max_new_tokens: int = 128, temperature: float = 0.7, top_p: float = 1.0,
           model_name: str = "model") -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Answer, critique per a seeded-random principle, revise; rows ``{messages: [user, revised], provenance}``.

    Each of the three steps is one batched ``generate`` over all prompts. Empty revisions are dropped and
    counted in ``stats["empty_revision"]``; ``stats["unchanged"]`` counts kept revisions equal to the answer.
    """
    chosen = _pick(principles, len(prompts), seed)
    sampling = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}

    def gen(chats: list[Messages], step: int) -> list[str]:
        # A seed per step: reusing one would give the critique the same random draws as the answer.
        return generate(model, tokenizer, chats, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, seed=seed + step)

    chats: list[Messages] = [[{"role": "user", "content": p}] for p in prompts]
    initial = gen(chats, 0)
    chats = [[*c, {"role": "assistant", "content": a}, {"role": "user", "content": pr.critique}]
             for c, a, pr in zip(chats, initial, chosen)]
    critiques = gen(chats, 1)
    chats = [[*c, {"role": "assistant", "content": k}, {"role": "user", "content": pr.revision}]
             for c, k, pr in zip(chats, critiques, chosen)]
    revised = gen(chats, 2)

    rows, stats = [], {"prompts": len(prompts), "written": 0, "empty_revision": 0, "unchanged": 0}
    for prompt, pr, a, k, r in zip(prompts, chosen, initial, critiques, revised):
        if not r.strip():  # an empty assistant turn has nothing to train on; the SFT reader would reject it
            stats["empty_revision"] += 1
            continue
        stats["unchanged"] += r.strip() == a.strip()
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": r}],
                     "provenance": {"method": "sl-cai", "model": model_name, "principle": pr.name,
                                    "initial": a, "critique": k, "sampling": sampling}})
    stats["written"] = len(rows)
    return rows, stats


def rl_cai(model: torch.nn.Module, tokenizer, prompts: list[str], principles: list[Principle], judge: Judge, *,
           judge_name: str, seed: int = 0, n_samples: int = 2, temperature: float = 1.0, top_p: float = 1.0,
           max_new_tokens: int = 128, margin: float = 0.0,
           policy_model: str = "model") -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sample ``n_samples`` answers per prompt (one batched, seeded ``generate``), judge every pair of them in both
    orders on a seeded-random principle's criterion, keep the pairs with an "a" or "b" verdict.

    Rows are ``{prompt, chosen, rejected, provenance}``; ``p_first_order`` / ``p_second_order`` in the provenance
    are the judge's probability that the chosen answer is better when shown first / second. ``stats`` counts
    ``pairs``, ``kept``, ``ties``, ``inconsistent``, ``identical`` (same text twice) and ``empty`` (an empty answer);
    ``judge_p_slot_a`` is the judge's mean probability for whichever answer is in slot A over both orders of every
    judged pair: 0.5 for a judge without position bias, near 1 for one that mostly reads the position.
    """
    if n_samples < 2:
        raise ValueError(f"rl-cai compares answers: n_samples must be at least 2, got {n_samples}")
    if temperature <= 0:
        raise ValueError("rl-cai needs temperature > 0: greedy decoding gives every sample the same text")
    chosen = _pick(principles, len(prompts), seed)
    samples = generate(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts for _ in range(n_samples)],
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    sampling = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed,
                "n_samples": n_samples, "policy_model": policy_model}
    rows: list[dict[str, Any]] = []
    stats = {"prompts": len(prompts), "pairs": 0, "kept": 0, "ties": 0, "inconsistent": 0, "identical": 0, "empty": 0}
    slot_a: list[float] = []  # the judge's P(slot A wins), both orders: 0.5 on average for a judge without bias
    for i, (prompt, pr) in enumerate(zip(prompts, chosen)):
        answers = samples[i * n_samples:(i + 1) * n_samples]
        for x in range(n_samples):
            for y in range(x + 1, n_samples):
                a, b = answers[x], answers[y]
                stats["pairs"] += 1
                if not a.strip() or not b.strip():
                    stats["empty"] += 1
                    continue
                if a.strip() == b.strip():
                    stats["identical"] += 1
                    continue
                v = both_orders(judge, prompt, a, b, pr.criterion, margin=margin)
                slot_a += [v.p_a_first, 1 - v.p_a_second]
                if v.verdict in ("tie", "inconsistent"):
                    stats["ties" if v.verdict == "tie" else "inconsistent"] += 1
                    continue
                # p_a_second is P(a better) with a shown second, i.e. with b shown first.
                good, bad, p_first, p_second = (a, b, v.p_a_first, v.p_a_second) if v.verdict == "a" else \
                    (b, a, 1 - v.p_a_second, 1 - v.p_a_first)
                rows.append({"prompt": prompt, "chosen": good, "rejected": bad,
                             "provenance": {"method": "rl-cai", "judge_model": judge_name,
                                            "judge_calibrated": isinstance(judge, CalibratedJudge),
                                            "principle": pr.name,
                                            "criterion": pr.criterion, "p_first_order": p_first,
                                            "p_second_order": p_second, "margin": margin, "sampling": sampling}})
    stats["kept"] = len(rows)
    stats["judge_p_slot_a"] = sum(slot_a) / len(slot_a) if slot_a else float("nan")
    return rows, stats
