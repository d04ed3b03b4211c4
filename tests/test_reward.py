"""Reward models: score read at each sequence's last response token, BT training, loading, ensembles."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.config import load_config
from posttrain.data import build_pairs, collate_pairs
from posttrain.methods.reward import pearson
from posttrain.models.heads import ScoreModel
from posttrain.recipes.reward import run as run_reward
from posttrain.rewards import Ensemble, load_reward
from tests.helpers import pair_rows, write_jsonl


def test_score_is_read_at_the_last_response_token_in_packed_rows(tiny_dir, tokenizer, tmp_path):
    pairs = build_pairs(write_jsonl(tmp_path / "p.jsonl", pair_rows(4)), tokenizer, max_seq_len=128)[0]
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64)
    model = ScoreModel(lm)
    torch.nn.init.normal_(model.head.weight)
    scores, lengths = model(collate_pairs([pairs[:3], pairs[3:]], tokenizer.pad_token_id))
    alone = []
    for p in pairs:
        for ex in (p.chosen, p.rejected):
            last = max(t for t, on in enumerate(ex.trained) if on)  # the response's <|im_end|>
            assert tokenizer.convert_ids_to_tokens(ex.input_ids[last]) == "<|im_end|>"
            h = lm.get_decoder()(input_ids=torch.tensor([ex.input_ids])).last_hidden_state[0, last]
            alone.append(model.head(h).squeeze())
    assert torch.allclose(scores, torch.stack(alone).float(), atol=1e-5)
    assert lengths.tolist() == [sum(ex.trained) for p in pairs for ex in (p.chosen, p.rejected)]


def test_bt_starts_at_ln2_and_pearson_hand_value():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 1, 2]) == pytest.approx(-0.5)  # cov -1/3 over var 2/3


def test_run_reward_end_to_end_then_load_and_ensemble(tiny_dir, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
    cfg = load_config(None, [f"model.name={tiny_dir}", f"data.train={path}", f"output_dir={tmp_path / 'rm'}",
                             "train.max_steps=12", "train.lr=5e-3", "data.eval_fraction=0.25"], method="reward")
    summary = run_reward(cfg)
    metrics = [json.loads(x) for x in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["eval/loss"] == pytest.approx(0.6931, abs=1e-4)  # zero-initialised head: all scores 0
    after = summary["eval_after"]
    assert after["eval/accuracy"] > 0.5 and after["eval/loss"] < metrics[0]["eval/loss"]
    assert {"eval/score_std", "eval/length_corr", "eval/score_p10"} <= set(after)

    from posttrain.recipes import RECIPES

    again = RECIPES[cfg.method].evaluate_run(cfg, tmp_path / "rm")  # what `posttrain eval RUN` prints
    assert again["eval/accuracy"] == pytest.approx(after["eval/accuracy"])
    assert again["eval/loss"] == pytest.approx(after["eval/loss"], abs=1e-4)
    rm = load_reward(str(tmp_path / "rm"))
    prompts = ["Name colour number 3.", "Name colour number 3."]
    got = rm.score(prompts, ["amber.", "I refuse to name colour 3, sorry."])
    assert got[0] > got[1]
    three = rm.score(prompts + prompts[:1], ["amber.", "no.", "amber."], batch_size=1)  # odd count, tiny batches
    assert three[0] == pytest.approx(three[2], abs=1e-5) and three[0] == pytest.approx(got[0], abs=1e-4)
    mean = Ensemble([rm, rm], "mean").score(prompts, ["amber.", "x."])
    low = load_reward([str(tmp_path / "rm"), str(tmp_path / "rm")], reduce="min").score(prompts, ["amber.", "x."])
    assert mean == pytest.approx(low, abs=1e-6)
    with pytest.raises(FileNotFoundError, match="not a reward-model run"):
        load_reward(str(tmp_path))
