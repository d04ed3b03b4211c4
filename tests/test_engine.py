"""The loop on its own: the lr schedule, accumulation invariance, freed-memory handling (the end-to-end SFT runs,
resume included, are in test_sft.py)."""


import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.data import collate
from posttrain.engine import warmup_cosine
from posttrain.engine.loop import train_loop
from posttrain.methods import SFT
from tests.helpers import loop_opts, random_examples


def test_warmup_cosine_hand_values():
    kw = dict(total_steps=11, warmup_steps=2, min_ratio=0.1)
    assert warmup_cosine(0, **kw) == 0.5 and warmup_cosine(1, **kw) == 1.0  # linear warmup
    assert warmup_cosine(2, **kw) == pytest.approx(1.0)  # peak right after warmup
    # halfway through the decay (steps 2..10, progress 4/8): 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    assert warmup_cosine(6, **kw) == pytest.approx(0.55)
    assert warmup_cosine(10, **kw) == pytest.approx(0.1)  # ends at 10% of peak


class FixedBatches:
    def __init__(self, micro):
        self.micro = micro

    def step(self, step):
        return self.micro


def one_step(tiny_dir, micro, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64)
    opts = loop_opts(1, lr=1e-2, max_grad_norm=None)
    recs = train_loop(model, SFT(), FixedBatches(micro), opts, tmp_path)
    return recs[-1]["loss"], [p.detach().clone() for p in model.parameters()]


def test_four_micro_batches_with_accumulation_equal_one_batch_of_four(tiny_dir, tmp_path):
    exs = random_examples(4, 49152, seed=1)  # different lengths, so per-micro-batch means would differ
    loss_big, params_big = one_step(tiny_dir, [collate([[e] for e in exs], 0)], tmp_path / "a")
    loss_acc, params_acc = one_step(tiny_dir, [collate([[e]], 0) for e in exs], tmp_path / "b")
    assert loss_big == pytest.approx(loss_acc, abs=1e-9)
    for a, b in zip(params_big, params_acc):
        assert torch.allclose(a, b, atol=1e-9)


def test_cpu_training_keeps_freed_memory_on_glibc():
    import platform

    from posttrain.engine.loop import keep_freed_cpu_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_cpu_memory() is True


def test_max_minutes_ends_the_run_after_the_step_that_crosses_it(tiny_dir, tmp_path, monkeypatch):
    import itertools

    from posttrain.engine import loop
    from posttrain.engine.checkpoint import list_checkpoints

    clock = itertools.count(0, 60)  # each look at the clock is a minute later: 0 at the start, then 60, 120, ...
    monkeypatch.setattr(loop.time, "monotonic", lambda: next(clock))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64)
    evals = []
    recs = train_loop(model, SFT(), FixedBatches([collate([[e] for e in random_examples(2, 49152)], 0)]),
                      loop_opts(10, lr=1e-3, max_minutes=2.5, eval_every=5), tmp_path,
                      evaluate=lambda m: evals.append(1) or {"eval/loss": 1.0})
    # 150 s of budget: the checks after steps 1 and 2 see 60 and 120 s, the one after step 3 sees 180 s
    assert recs[-1] == {"step": 3, "stopped": {"max_minutes": 2.5, "steps": 3, "of": 10}}
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in recs if "eval/loss" in r] == [0, 3] and len(evals) == 2  # the final eval at the stop
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000003"]


def test_max_minutes_stops_only_after_the_last_step_of_a_shared_batch(tiny_dir, tmp_path, monkeypatch):
    import itertools

    from posttrain.engine import loop

    clock = itertools.count(0, 60)
    monkeypatch.setattr(loop.time, "monotonic", lambda: next(clock))
    batches = FixedBatches([collate([[e] for e in random_examples(2, 49152)], 0)])
    batches.mu = 2  # two steps per rollout: the clock is read after steps 2 and 4 only (60 s, 120 s, 180 s ...)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64)
    recs = train_loop(model, SFT(), batches, loop_opts(10, lr=1e-3, max_minutes=1.5), tmp_path)
    assert recs[-1]["stopped"] == {"max_minutes": 1.5, "steps": 4, "of": 10}  # 120 s > 90 s, read after step 4


def test_without_max_minutes_the_clock_is_never_read(tiny_dir, tmp_path, monkeypatch):
    from posttrain.engine import loop

    monkeypatch.setattr(loop.time, "monotonic", lambda: pytest.fail("the clock was read without a budget"))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64)
    recs = train_loop(model, SFT(), FixedBatches([collate([[e] for e in random_examples(2, 49152)], 0)]),
                      loop_opts(2, lr=1e-3), tmp_path)
    assert [r["step"] for r in recs] == [1, 2]
