"""KTO end to end: the method against log-probs computed apart, its reference point z0 (mismatched rows, no
gradient), the loop's per-class metrics, a run with its weights and metrics, resume, and the config's refusals."""

import json

import pytest
import torch

from posttrain.config import load_config
from posttrain.data import build_unpaired, collate_unpaired, suggested_weights
from posttrain.engine.loop import train_loop
from posttrain.engine.resume import Resume
from posttrain.errors import ConfigError
from posttrain.losses.kto import kto_loss, mismatched_order
from posttrain.methods import SFT
from posttrain.methods.kto import KTOMethod, KTOParams, kto_batches
from posttrain.models.reference import make_reference
from posttrain.recipes.kto import run as run_kto
from tests.helpers import loop_opts, lora_policy, random_examples, step_records, write_jsonl

COLOURS = ["red", "green", "blue", "amber", "violet", "teal", "olive", "coral"]


def kto_rows(n_prompts: int, n_undesirable: int) -> list[dict]:
    """A desirable answer for every prompt, an undesirable one for the first ``n_undesirable`` (as `posttrain data
    unpair` writes a pair: two rows of one prompt)."""
    rows = [{"prompt": f"Name colour number {i}.", "completion": f"{COLOURS[i % 8]}.", "label": True}
            for i in range(n_prompts)]
    rows += [{"prompt": f"Name colour number {i}.", "completion": f"I refuse to name colour {i}." + " no" * (i % 3),
              "label": False} for i in range(n_undesirable)]
    return rows


@pytest.fixture()
def rows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "kto.jsonl", kto_rows(3, 2))
    return build_unpaired(path, tokenizer, max_seq_len=128)[0]


@pytest.fixture(scope="module")
def policy(tiny_dir):
    return lora_policy(tiny_dir, seed=3, scale=0.3).double()


def summed_logp(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """The completion's summed log-prob from a plain forward of prompt + completion alone."""
    ids = torch.tensor([prompt + completion])
    logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
    return logp[len(prompt) - 1:].sum()


def manual(model, rows, order):
    """(policy own, ref own, policy mismatched, ref mismatched) summed log-probs, each row on its own."""
    pairs = [(r.prompt_ids, r.completion_ids) for r in rows]
    mis = [(r.prompt_ids, rows[j].completion_ids) for r, j in zip(rows, order)]
    pol = [torch.stack([summed_logp(model, p, c) for p, c in seqs]) for seqs in (pairs, mis)]
    with torch.no_grad(), model.disable_adapter():
        ref = [torch.stack([summed_logp(model, p, c) for p, c in seqs]) for seqs in (pairs, mis)]
    return pol[0], ref[0], pol[1], ref[1]


def method(model, **kw) -> KTOMethod:
    params = KTOParams(**{"beta": 0.5, "desirable_weight": 1.3, "undesirable_weight": 0.8, **kw})
    return KTOMethod(params, make_reference(model, lora=True, per_token=True))


def test_loss_equals_kto_loss_from_log_probs_computed_apart(policy, rows, tokenizer):
    order = mismatched_order(len(rows))
    batch = collate_unpaired(rows, order, tokenizer.pad_token_id)
    loss, metrics = method(policy).loss_sum(policy, batch)
    with torch.no_grad():
        pol, ref, pol_mis, ref_mis = manual(policy, rows, order)
    z0 = (pol_mis - ref_mis).mean().clamp(min=0.0)
    assert z0 > 0  # the clamp is not what makes the two agree
    labels = torch.tensor([r.label for r in rows])
    want, reward = kto_loss(pol, ref, labels, z0, 0.5, 1.3, 0.8)
    assert float(loss) == pytest.approx(float(want.sum()), abs=1e-8)
    assert metrics["kl"] == pytest.approx(float(z0), abs=1e-8)
    assert metrics["rewards/desirable"] == pytest.approx((float(reward[labels].sum()), 3.0), abs=1e-8)
    assert metrics["rewards/undesirable"] == pytest.approx((float(reward[~labels].sum()), 2.0), abs=1e-8)
    agree = float(((reward > 0) == labels).double().mean())
    assert metrics["accuracy"] == pytest.approx(agree)


def test_z0_comes_from_the_mismatched_rows_only(policy, rows, tokenizer):
    kto = method(policy)
    a, b = [1, 2, 0, 4, 3], [2, 0, 1, 4, 3]  # two ways of giving every prompt another row's completion
    with torch.no_grad():
        ta = kto.row_terms(policy, collate_unpaired(rows, a, tokenizer.pad_token_id))
        tb = kto.row_terms(policy, collate_unpaired(rows, b, tokenizer.pad_token_id))
        want = [manual(policy, rows, o) for o in (a, b)]
    for t, (_, _, pm, rm) in zip((ta, tb), want):
        assert float(t.z0) == pytest.approx(float((pm - rm).mean().clamp(min=0.0)), abs=1e-8)
    assert float(ta.z0) != pytest.approx(float(tb.z0), abs=1e-6)  # another pairing, another reference point
    assert torch.allclose(ta.reward, tb.reward, atol=1e-10)  # the rows' own rewards do not move
    assert not torch.allclose(ta.loss, tb.loss, atol=1e-6)  # but the loss does, through z0


def test_no_gradient_flows_through_z0(policy, rows, tokenizer):
    order = mismatched_order(len(rows))
    batch = collate_unpaired(rows, order, tokenizer.pad_token_id)
    kto = method(policy, beta=2.0)
    params = [p for p in policy.parameters() if p.requires_grad]

    def grads(loss):
        policy.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in params]

    loss, metrics = kto.loss_sum(policy, batch)
    got = grads(loss)
    pol, ref, pol_mis, ref_mis = manual(policy, rows, order)
    labels = torch.tensor([r.label for r in rows])
    fixed = grads(kto_loss(pol, ref, labels, metrics["kl"], 2.0, 1.3, 0.8)[0].sum())  # z0 a constant
    assert all(torch.allclose(g, f, atol=1e-9) for g, f in zip(got, fixed))
    pol, ref, pol_mis, ref_mis = manual(policy, rows, order)
    z = (pol_mis - ref_mis).mean().clamp(min=0.0)  # z0 with its graph, to show the test can tell
    r = pol - ref
    w = torch.where(labels, 1.3, 0.8)
    live = grads((w * (1 - torch.sigmoid(2.0 * torch.where(labels, r - z, z - r)))).sum())
    assert not all(torch.allclose(g, f, atol=1e-6) for g, f in zip(live, fixed))


def test_a_batch_needs_two_rows(rows, tokenizer):
    with pytest.raises(ValueError, match="at least 2 rows"):
        kto_batches(rows[:1], 4, tokenizer.pad_token_id, 128)
    batches = kto_batches(rows, 2, tokenizer.pad_token_id, 128)
    assert sorted(i for b in batches for i in b["row_index"].tolist()) == list(range(5))  # each row once
    assert [int(b["desirable"].numel()) for b in batches] == [2, 3]  # the last row joins the batch before it


class CountedMetric(SFT):
    """SFT's loss with a (sum, count) metric per micro-batch, the form of KTO's per-class rewards."""

    def __init__(self, parts):
        super().__init__()
        self.parts, self.calls = parts, 0

    def loss_sum(self, model, batch):
        loss, m = super().loss_sum(model, batch)
        part = self.parts[self.calls % len(self.parts)]
        self.calls += 1
        return loss, {**m, "mean_of_some": part, "never": (0.0, 0.0), "plain": float(part[1])}


def test_the_loop_divides_a_counted_metric_once(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain.data import collate

    class Fixed:
        def step(self, step):
            return [collate([[e]], 0) for e in random_examples(3, 49152, seed=step)]

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    recs = train_loop(model, CountedMetric([(6.0, 2.0), (0.0, 0.0), (3.0, 1.0)]), Fixed(), loop_opts(1), tmp_path)
    rec = next(r for r in recs if "loss" in r)
    assert rec["mean_of_some"] == pytest.approx(3.0)  # (6 + 3) / (2 + 1), not a mean of per-micro-batch means
    assert "never" not in rec and rec["plain"] == pytest.approx(1.0)


def kto_cfg(tiny_dir, tmp_path, out, *extra):
    path = tmp_path / "kto.jsonl"
    if not path.exists():
        write_jsonl(path, kto_rows(8, 4))  # 8 desirable to 4 undesirable: weights other than (1, 1)
    return load_config(None, [f"model.name={tiny_dir}", f"data.train={path}", f"output_dir={out}",
                              "data.eval_fraction=0.25", "data.max_seq_len=64", "train.micro_batch_size=3",
                              "train.max_steps=4", "train.lr=1e-3", "train.min_lr_ratio=1.0", *extra], method="kto")


def test_run_kto_end_to_end_and_resume_equals_uninterrupted(tiny_dir, tmp_path):
    full = tmp_path / "full"
    cfg = kto_cfg(tiny_dir, tmp_path, full)
    summary = run_kto(cfg)
    assert (full / "adapter" / "adapter_model.safetensors").exists() and (full / "report.html").exists()
    metrics = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and metrics[0]["eval/accuracy"] == 0.5  # policy == reference: all ties
    w = summary["kto_weights"]
    held_d, held_u = 8 - w["train_desirable"], 4 - w["train_undesirable"]  # the split draws whole prompts
    assert held_d >= 1 and held_d + held_u >= 2
    # At step 0 every reward and z0 is 0, so a row's loss is its class weight times 1 - sigmoid(0) = 1/2.
    want = 0.5 * (w["desirable_weight"] * held_d + w["undesirable_weight"] * held_u) / (held_d + held_u)
    assert metrics[0]["eval/loss"] == pytest.approx(want, abs=1e-6) and metrics[0]["eval/kl"] == 0.0
    steps = [m for m in metrics if "loss" in m]
    assert {"kl", "accuracy", "rewards/desirable", "rewards/undesirable", "rewards/margin", "logps/desirable",
            "logps/undesirable"} <= set().union(*steps)
    assert {"kl", "accuracy", "rewards/desirable"} <= set(steps[0])
    assert (w["desirable_weight"], w["undesirable_weight"]) == suggested_weights(w["train_desirable"],
                                                                                 w["train_undesirable"])
    assert w["source"] == "suggested" and w["desirable_weight"] != 1.0
    assert json.loads((full / "summary.json").read_text())["kto_weights"] == w
    assert summary["eval_after"]["step"] == 4 and "eval/rewards/desirable" in summary["eval_after"]

    from posttrain.recipes import RECIPES

    again = RECIPES["kto"].evaluate_run(cfg, full)  # `posttrain eval RUN`: the run's own final numbers
    for key in ("eval/loss", "eval/accuracy", "eval/kl", "eval/rewards/desirable"):
        assert again[key] == pytest.approx(summary["eval_after"][key], abs=1e-5)

    part = tmp_path / "part"
    run_kto(kto_cfg(tiny_dir, tmp_path, part, "train.max_steps=2"))
    run_kto(kto_cfg(tiny_dir, tmp_path, part), resume=Resume(extend_steps=True))
    keys = ("step", "loss", "kl", "accuracy", "grad_norm")
    a, b = step_records(full, keys), step_records(part, keys)
    assert [s for s, *_ in a] == [s for s, *_ in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-6)


def test_weights_given_or_suggested(rows):
    from posttrain.config import KTOSection
    from posttrain.recipes.kto import kto_params

    params, w = kto_params(KTOSection(), rows)  # 3 desirable to 2: (1, 1) gives 1.5, past the paper's 4/3
    assert (params.desirable_weight, params.undesirable_weight) == suggested_weights(3, 2) == (pytest.approx(8 / 9), 1)
    assert w["source"] == "suggested" and w["ratio"] == pytest.approx(4 / 3) and "outside" not in w["line"]
    params, w = kto_params(KTOSection(undesirable_weight=2.5, beta=0.3), rows)  # the other weight: TRL's 1
    assert (params.beta, params.desirable_weight, params.undesirable_weight, w["source"]) == (0.3, 1.0, 2.5, "given")
    assert w["ratio"] == pytest.approx(0.6) and "outside the paper's [1, 1.33]" in w["line"]
    params, w = kto_params(KTOSection(), [r for r in rows if r.label])
    assert w["ratio"] is None and "desirable rows: KTO pushes one side only" in w["line"]


def test_config_refusals(tmp_path, tiny_dir):
    with pytest.raises(ConfigError, match="micro_batch_size=1: kto needs at least 2 rows"):
        kto_cfg(tiny_dir, tmp_path, tmp_path / "x", "train.micro_batch_size=1")
    with pytest.raises(ConfigError, match="desirable_weight"):
        kto_cfg(tiny_dir, tmp_path, tmp_path / "x", "kto.desirable_weight=0")
    one = write_jsonl(tmp_path / "one.jsonl", kto_rows(1, 0))
    with pytest.raises(ConfigError, match="held-out set has 1 row"):
        run_kto(kto_cfg(tiny_dir, tmp_path, tmp_path / "y", f"data.eval={one}"))


def test_run_kto_full_fine_tuning_against_a_frozen_copy(tiny_dir, tmp_path):
    out = tmp_path / "full-ft"
    summary = run_kto(kto_cfg(tiny_dir, tmp_path, out, "finetune=full", "train.max_steps=2"))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["eval/accuracy"] == 0.5 and metrics[0]["eval/kl"] == 0.0  # the copy is the policy at step 0
    assert (out / "model").is_dir() and summary["eval_after"]["eval/accuracy"] > 0.5
