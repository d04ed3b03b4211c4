"""Best-fit packing, and packed batches equal to the same examples one by one (loss and gradients)."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.data import Example, best_fit, collate, num_targets
from posttrain.methods import completion_loss_sum
from posttrain.models.attention import register as register_packed_attention
from posttrain.models.attention import segment_lengths
from tests.helpers import random_examples


def test_best_fit_places_everything_within_capacity():
    rnd = random.Random(0)
    lengths = [rnd.randint(1, 100) for _ in range(200)]
    bins = best_fit(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= 1.25 * sum(lengths) / 128 + 1  # close to the lower bound


def test_best_fit_prefers_the_fullest_bin():
    # Decreasing order: 6 -> bin A (free 4), 5 -> bin B (free 5), 4 -> A (best fit: exact), 3 -> B.
    assert best_fit([6, 5, 4, 3], 10) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="more than the packing capacity"):
        best_fit([11], 10)



@pytest.mark.parametrize("attn", ["sdpa_packed", "sdpa", "eager"])
def test_packed_equals_unpacked_loss_and_gradients(tiny_dir, attn, monkeypatch):
    # float64 so that the comparison tests the masking, not fp32 summation order.
    register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64, attn_implementation=attn)
    exs = random_examples(7, model.config.vocab_size)

    def loss_and_grads(batch):
        model.zero_grad()
        loss = completion_loss_sum(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    one_by_one = [loss_and_grads(collate([[e]], pad_id=0)) for e in exs]
    loss_sep = sum(loss for loss, _ in one_by_one)
    grads_sep = [sum(g[i] for _, g in one_by_one) for i in range(len(one_by_one[0][1]))]

    packed = collate([exs[:4], exs[4:]], pad_id=0)  # two rows, several segments each, padding at the end
    assert num_targets(packed) == sum(num_targets(collate([[e]], 0)) for e in exs)
    loss_packed, grads_packed = loss_and_grads(packed)
    assert torch.allclose(loss_packed, loss_sep, atol=1e-5)
    for a, b in zip(grads_packed, grads_sep):
        assert torch.allclose(a, b, atol=1e-5)

    if attn == "sdpa_packed":
        # The per-example attention really ran: one causal SDPA call per example and layer, over one row of the
        # real tokens; the rows' padding never reaches the model.
        calls, rows = [], []
        real = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                            lambda *a, **k: calls.append(k) or real(*a, **k))
        hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: rows.append(tuple(i[0].shape)))
        completion_loss_sum(model, packed)
        hook.remove()
        monkeypatch.undo()
        assert packed["input_ids"].numel() > int(packed["num_tokens"])  # there was padding to drop
        assert rows == [(1, int(packed["num_tokens"]))]
        assert len(calls) == len(exs) * model.config.num_hidden_layers and all(c["is_causal"] for c in calls)

    # Without restarting positions the segments would see each other: the check above has teeth.
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    assert not torch.allclose(completion_loss_sum(model, leaky).detach(), loss_sep, atol=1e-3)


def test_segment_lengths_split_rows_where_positions_restart():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [3, 4, 0, 1, 2, 3, 4]])  # a row may start mid-count (a cut example)
    assert segment_lengths(pos) == [[3, 2, 2], [2, 5]]


def test_collate_masks_padding_and_segment_starts():
    exs = [Example([5, 6, 7], [False, True, True]), Example([8, 9], [True, True])]
    b = collate([exs], pad_id=0, pad_to=7)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100]]  # segment starts are never targets
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert int(b["num_tokens"]) == 5 and b["row_tokens"].tolist() == [5]
