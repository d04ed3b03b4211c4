"""Process rewards in online RL: the shared step split, GRPO's prm term (each reduction by hand on a fake scorer, then
a tiny PRM run through the term), the step-end tokens of sampled completions (exact, on the real tokenizer), PPO's
per-token step rewards by hand, PPO refusing a prm run in the reward model's place (and the reverse), and the watch
plot drawing the proxy beside the watched outcome."""

import json

import pytest
import torch

from posttrain.config import PPOSection, load_config
from posttrain.curate import prm_labels
from posttrain.data.steps import STEP_SPLITS, split_steps, step_spans
from posttrain.errors import ConfigError
from posttrain.losses.rl import STEP_REWARDS, clip_steps, kl_shaped_rewards, prob_steps, step_shaped_rewards
from posttrain.methods.ppo import StepRewards
from posttrain.recipes.ppo import check_scorers
from posttrain.report import write_watch_plot
from posttrain.rewards.functions import REWARD_FUNCTIONS, Combined
from posttrain.rewards.process import REDUCES, completion_steps, prm_reward, prm_scores
from tests.helpers import tiny_prm_run, write_jsonl

# --- the step split ---------------------------------------------------------------------------------------------


def test_step_spans_locate_the_stripped_steps_and_prm_labels_cuts_the_same_way():
    text = "  First: 2 + 3 = 5  \n\nThen 5 * 2 = 10\n \n#### 10\n"
    spans = step_spans(text)
    assert spans == [(2, 18), (22, 37), (40, 47)]
    assert [text[a:b] for a, b in spans] == split_steps(text) == ["First: 2 + 3 = 5", "Then 5 * 2 = 10", "#### 10"]
    assert split_steps("a\nb\n \n\nc", "paragraph") == ["a\nb", "c"] and step_spans("a\nb\n \n\nc", "paragraph") == \
        [(0, 3), (7, 8)]
    assert step_spans("") == [] and step_spans("\n  \n") == []
    assert prm_labels.split_steps is split_steps and prm_labels.STEP_SPLITS is STEP_SPLITS
    with pytest.raises(ValueError, match="step split 'sentence': expected one of line, paragraph"):
        step_spans("a", "sentence")


# --- GRPO's prm term --------------------------------------------------------------------------------------------

class FakeScorer:
    """Fixed step probabilities by step text; records what it was asked."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def score_steps(self, prompts, step_lists, batch_size=8):
        self.calls.append((list(prompts), [list(s) for s in step_lists], batch_size))
        return [[self.table[s] for s in steps] for steps in step_lists]


TABLE = {"a": 0.9, "b": 0.5, "c": 0.2, "d": 0.8}
COMPLETIONS = ["a\nb\n\nc", "   \n", "d", " c \n a "]


@pytest.mark.parametrize("reduce,want", [
    ("min", [0.2, 0.0, 0.8, 0.2]),
    ("last", [0.2, 0.0, 0.8, 0.9]),
    ("mean", [(0.9 + 0.5 + 0.2) / 3, 0.0, 0.8, (0.2 + 0.9) / 2]),  # 0.533333, 0.55
    ("prod", [0.09, 0.0, 0.8, 0.18]),  # 0.9 * 0.5 * 0.2; 0.2 * 0.9
])
def test_each_reduction_by_hand_and_no_steps_scores_zero(reduce, want):
    scorer = FakeScorer(TABLE)
    prompts = ["p0", "p1", [{"role": "user", "content": "p2"}], "p3"]
    got = prm_scores(scorer, prompts, COMPLETIONS, reduce, batch_size=3)
    assert got == pytest.approx(want, abs=1e-12)
    # the completion without steps is not sent; the others keep their own prompts
    assert scorer.calls == [(["p0", [{"role": "user", "content": "p2"}], "p3"], [["a", "b", "c"], ["d"], ["c", "a"]],
                             3)]


def test_reductions_table_and_paragraph_split():
    assert set(REDUCES) == {"min", "last", "mean", "prod"}
    assert prm_scores(FakeScorer({"a\nb": 0.5, "c": 0.4}), ["q"], ["a\nb\n\nc"], "prod", "paragraph") == \
        [pytest.approx(0.2)]
    assert prm_scores(FakeScorer(TABLE), [], [], "min") == []


def test_the_term_is_registered_and_refuses_bad_options_before_loading(tmp_path):
    assert REWARD_FUNCTIONS["prm"] is prm_reward
    with pytest.raises(ValueError, match="needs options: {path: <a `posttrain prm` run folder>}"):
        prm_reward(["q"], ["a"])
    with pytest.raises(ValueError, match="reduce 'max': expected one of min, last, mean, prod"):
        prm_reward(["q"], ["a"], path=str(tmp_path / "nowhere"), reduce="max")


@pytest.fixture(scope="module")
def prm_run(tiny_dir, tmp_path_factory):
    return tiny_prm_run(tiny_dir, tmp_path_factory.mktemp("prm"))


def test_a_tiny_prm_run_scores_through_the_term_end_to_end(prm_run):
    from posttrain.rewards import load_prm

    prompts = ["What is (1 + 2) * 2?", "What is (3 + 2) * 2?", "What is 1 + 1?"]
    completions = ["1 + 2 = 3.\n3 * 2 = 7!\nThe answer is 6.", "3 + 2 = 5.\n\n5 * 2 = 10.", "\n"]
    probs = load_prm(prm_run, dtype="float32").score_steps(
        prompts[:2], [["1 + 2 = 3.", "3 * 2 = 7!", "The answer is 6."], ["3 + 2 = 5.", "5 * 2 = 10."]])
    combined = Combined([("prm", 1.0, {"path": str(prm_run), "reduce": reduce, "dtype": "float32"})
                         for reduce in REDUCES])
    combined(prompts, completions, answer=["#### 6", "#### 10", "#### 2"])
    terms = {name: part for name, part in combined.parts.items() if not name.endswith("@w")}
    assert list(terms) == ["prm", "prm#1", "prm#2", "prm#3"]
    for part, reduce in zip(terms.values(), REDUCES):
        assert part == pytest.approx([REDUCES[reduce](p) for p in probs] + [0.0], abs=1e-5)
    assert 0 < terms["prm"][0] < 1 and terms["prm#3"][0] < terms["prm"][0]  # prod below min with three steps


# --- the step-end tokens of a sampled completion -----------------------------------------------------------------

def _check(tok, ids, steps, ends):
    """By decoding: the prefix through a step's end token spells the text through the step; one token less does
    not."""
    text = tok.decode(ids, skip_special_tokens=True)
    for step, e in zip(steps, ends):
        upto = text[:text.index(step) + len(step)]
        assert tok.decode(ids[:e + 1], skip_special_tokens=True).startswith(upto)
        assert not tok.decode(ids[:e], skip_special_tokens=True).startswith(upto)


def test_step_end_tokens_by_hand_on_the_real_tokenizer(tokenizer):
    # '2','+','3',' =',' ','5','.','\n','So',' ','5': step 1 ends on '.' (6), step 2 on the last '5' (10)
    ids = tokenizer("2+3 = 5.\nSo 5", add_special_tokens=False)["input_ids"]
    assert completion_steps(tokenizer, ids) == (["2+3 = 5.", "So 5"], [6, 10])
    # 'x', then three byte tokens of one character, '\n', 'y': the step ends on the character's last byte (3)
    ids = tokenizer("x\U0001d518\ny", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and completion_steps(tokenizer, ids) == (["x\U0001d518", "y"], [3, 5])
    # 'a','.','\n\n ',' b','!','\n': the blank line is no step, the trailing newline no part of one
    ids = tokenizer("a.\n\n  b!\n", add_special_tokens=False)["input_ids"]
    assert completion_steps(tokenizer, ids) == (["a.", "b!"], [1, 4])


def test_step_end_tokens_follow_the_sampled_tokens_not_a_re_tokenisation(tokenizer):
    a, b = (tokenizer(x, add_special_tokens=False)["input_ids"] for x in ("a", "b"))
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] != a + b  # 'ab' is one token when re-tokenised
    rest = tokenizer(".\nNo", add_special_tokens=False)["input_ids"]
    ids = [*a, *b, *rest, tokenizer.eos_token_id]  # as sampled: 'a', 'b', '.', '\n', 'No', EOS
    steps, ends = completion_steps(tokenizer, ids)
    assert (steps, ends) == (["ab.", "No"], [2, 4])
    _check(tokenizer, ids, steps, ends)
    long = tokenizer("First, 2+3 = 5.\nThen 5 * 4 = 20 \n\nÜnïcode ends in 🙂\n  So the answer is 20",
                     add_special_tokens=False)["input_ids"]
    steps, ends = completion_steps(tokenizer, long)
    assert len(steps) == 4 and ends == sorted(ends) and ends[-1] == len(long) - 1
    _check(tokenizer, long, steps, ends)
    assert completion_steps(tokenizer, [tokenizer.eos_token_id]) == ([], [])


# --- PPO's step rewards ------------------------------------------------------------------------------------------

def test_step_shaped_rewards_by_hand():
    base = torch.tensor([[0.1, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    steps = torch.tensor([[0.9, 0.2, 0.4], [0.7, 0.3, 0.0]])
    tokens = torch.tensor([[1, 4, 4], [2, 2, 0]])  # row 0: two steps end on token 4; row 1: its third is padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    got = step_shaped_rewards(base, steps, tokens, mask, coef=2.0)
    torch.testing.assert_close(got, torch.tensor([[0.1, 1.8, 0.0, 0.0, 1.2], [0.0, 0.0, 2.0, 0.0, 0.0]]))
    assert torch.equal(prob_steps(steps, mask), steps * mask)
    # clip: min(p - 0.5, 0): 0, -0.3, -0.1; 0, -0.2, and the padded step 0 (not -0.5)
    torch.testing.assert_close(clip_steps(steps, mask), torch.tensor([[0.0, -0.3, -0.1], [0.0, -0.2, 0.0]]))
    assert set(STEP_REWARDS) == set(PPOSection.model_fields["step_reward_form"].annotation.__args__)
    assert set(STEP_SPLITS) == set(PPOSection.model_fields["step_split"].annotation.__args__)


def test_step_rewards_land_on_each_steps_last_token_next_to_the_outcome_score(tokenizer):
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    comps = [enc("a.\nb!") + [tokenizer.eos_token_id], enc("  \n"), enc("c.")]  # ends: [1, 4]; none; [1]
    scorer = FakeScorer({"a.": 0.9, "b!": 0.2, "c.": 0.6})
    mask = torch.zeros(3, 6)
    for i, c in enumerate(comps):
        mask[i, :len(c)] = 1.0
    logp, ref = torch.full((3, 6), -1.0), torch.full((3, 6), -1.5)  # KL term -0.1 * 0.5 = -0.05 a token
    outcome = kl_shaped_rewards(torch.tensor([1.0, 2.0, 3.0]), logp, ref, mask, 0.1)
    chats = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    rewards, metrics = StepRewards(scorer, 0.5, "prob", "line", batch_size=2)(tokenizer, chats, comps, outcome)
    assert scorer.calls == [([chats[0], chats[2]], [["a.", "b!"], ["c."]], 2)]
    want = outcome.clone()
    want[0, 1] += 0.45
    want[0, 4] += 0.1
    want[2, 1] += 0.3
    torch.testing.assert_close(rewards, want)
    assert rewards[0, 5] == pytest.approx(1.0 - 0.05)  # the outcome score stays on the last token (EOS)
    assert float(metrics["reward/prm_steps"]) == pytest.approx((0.55 + 0.0 + 0.3) / 3)
    assert float(metrics["prm/steps"]) == pytest.approx(1.0) and float(metrics["prm/p_step"]) == pytest.approx(
        (0.9 + 0.2 + 0.6) / 3)
    clipped, m = StepRewards(scorer, 1.0, "clip", "line")(tokenizer, chats, comps, torch.zeros(3, 6))
    assert clipped[0].tolist() == pytest.approx([0, 0, 0, 0, -0.3, 0]) and float(m["reward/prm_steps"]) == \
        pytest.approx(-0.1)


def _fake_run(path, method):
    path.mkdir()
    (path / "config.yaml").write_text(f"method: {method}\n")
    return str(path)


def test_ppo_refuses_a_prm_run_as_the_reward_model_and_the_reverse(tmp_path):
    rm, rm2, prm = (_fake_run(tmp_path / name, method) for name, method in
                    (("rm", "reward"), ("rm2", "reward"), ("prm", "prm")))
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    cfg = lambda *o: load_config(None, ["model.name=x", f"data.train={data}", *o], method="ppo")  # noqa: E731
    check_scorers(cfg(f"ppo.reward_model={rm}", f"ppo.step_rewards={prm}"))
    check_scorers(cfg(f"ppo.reward_model={rm}"))
    with pytest.raises(ConfigError, match=r"ppo.reward_model: .*prm is a prm run; ppo.reward_model takes a "
                                          r"`posttrain reward` run; a prm run goes in ppo.step_rewards"):
        check_scorers(cfg(f"ppo.reward_model={prm}"))
    with pytest.raises(ConfigError, match=r"ppo.step_rewards: .*rm2 is a reward run; ppo.step_rewards takes a "
                                          r"`posttrain prm` run; a reward run goes in ppo.reward_model"):
        check_scorers(cfg(f"ppo.reward_model={rm}", f"ppo.step_rewards={rm2}"))
    with pytest.raises(ConfigError, match="ppo.step_rewards: .* is not a run folder"):
        check_scorers(cfg(f"ppo.reward_model={rm}", f"ppo.step_rewards={tmp_path}"))
    with pytest.raises(ConfigError, match="name the same run"):
        cfg(f"ppo.reward_model={rm}", f"ppo.step_rewards={rm}")


# --- the watch plot ----------------------------------------------------------------------------------------------

def test_the_watch_plot_draws_the_proxy_beside_the_watched_outcome_held_out_too(tmp_path):
    recs = []
    for step in (1, 2, 3):
        recs.append({"step": step, "loss": 0.1, "reward": 0.3 + 0.1 * step, "reward/prm": 0.2 + 0.1 * step,
                     "reward/regex": 0.2, "watch": 0.1, "watch/gsm8k_answer": 0.1})
        if step != 2:
            recs.append({"step": step, "eval/reward": 0.5 + step, "eval/reward/prm": 0.4 + step,
                         "eval/reward/regex": 0.1, "eval/watch": 0.05 * step, "eval/watch/gsm8k_answer": 0.05 * step})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    svg = write_watch_plot(tmp_path, "t").read_text()
    legend = [line.rsplit(">", 2)[-2].split("<")[0] for line in svg.splitlines() if line.endswith("</text>")]
    for label in ("reward", "reward/prm", "reward/regex", "watch/gsm8k_answer", "eval/reward", "eval/reward/prm",
                  "eval/watch/gsm8k_answer"):
        assert label in legend, label
    assert "watch" not in legend and "eval/watch" not in legend  # the only watch term is the total: drawn once
    assert svg.count("<polyline") == 3 + 1 + 4  # reward and its two terms; watch; the four held-out curves


# --- a PPO run with step rewards -----------------------------------------------------------------------------------

def test_a_ppo_run_with_step_rewards_logs_them_and_plots_the_watched_outcome(tiny_dir, tmp_path, prm_run):
    from posttrain.recipes.ppo import run as run_ppo
    from posttrain.recipes.reward import run as run_reward
    from tests.helpers import pair_rows

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(8))
    run_reward(load_config(None, [f"model.name={tiny_dir}", f"data.train={pairs}", f"output_dir={tmp_path / 'rm'}",
                                  "train.max_steps=1", "data.eval_fraction=0.25"], method="reward"))
    rows = [{"prompt": f"What is ({i} + 2) * 2?", "answer": f"#### {2 * i + 4}"} for i in range(8)]
    prompts = write_jsonl(tmp_path / "q.jsonl", rows)
    ppo = tmp_path / "ppo"
    run_ppo(load_config(None, [f"model.name={tiny_dir}", f"data.train={prompts}", "data.eval_fraction=0.25",
                               "train.max_steps=2", "train.micro_batch_size=4", "train.eval_every=2",
                               f"output_dir={ppo}", f"ppo.reward_model={tmp_path / 'rm'}",
                               f"ppo.step_rewards={prm_run}", "ppo.prompts_per_step=2", "ppo.samples_per_prompt=2",
                               "ppo.max_new_tokens=8"], method="ppo",
                        base={"watch": [{"name": "gsm8k_answer", "options": {"strict": False}}]}))
    logged = [m for m in map(json.loads, (ppo / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(logged) == 2 and all({"reward", "reward/prm_steps", "prm/steps", "prm/p_step"} <= set(m)
                                    for m in logged)
    assert all(0 <= m["reward/prm_steps"] <= m["prm/steps"] for m in logged)  # coef 1, each step's p in [0, 1]
    assert all(m["prm/steps"] > 0 and 0 < m["prm/p_step"] < 1 for m in logged)
    svg = (ppo / "rewards.svg").read_text()
    for label in (">reward<", ">reward/prm_steps<", ">watch/gsm8k_answer<", ">eval/reward<",
                  ">eval/watch/gsm8k_answer<"):
        assert label in svg, label
