"""Token-exact multi-turn trajectories (rollout.multiturn): the ids trained on are the sampled ids plus the
environment's rendered tokens, position by position; a template that breaks the prefix property splits the
trajectory (counted) instead of training on tokens nobody sampled; multi-turn GRPO masks environment tokens."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.data.render import render_prompt
from posttrain.data.templates import template_text
from posttrain.envs import ToolEnv
from posttrain.envs.base import StepResult
from posttrain.envs.schemas import CALCULATOR
from posttrain.rollout.interface import HFEngine
from posttrain.rollout.multiturn import TurnSettings, decode, encode, run_trajectories
from posttrain.rollout.sample import Rollout

CHATML_REPLY = "\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


class Recorder:
    """An engine that records exactly what its inner engine sampled."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def sample(self, prompt_ids, **kw):
        ro = self.inner.sample(prompt_ids, **kw)
        self.calls.append((prompt_ids, ro))
        return ro


class Scripted:
    """An engine that 'samples' given texts, one per turn, for every trajectory."""

    name, sync_s = "scripted", 0.0

    def __init__(self, tokenizer, texts):
        self.tok, self.texts, self.turn = tokenizer, texts, 0

    def sync(self, model, version):
        pass

    def sample(self, prompt_ids, **kw):
        ids = encode(self.tok, self.texts[self.turn])
        self.turn += 1
        n = len(prompt_ids)
        return Rollout(prompt_ids, [list(ids) for _ in range(n)], [""] * n, [True] * n, [[-1.0] * len(ids)] * n)


class Chatter:
    """Replies to every turn with a user message (or a tool result) until turn ``turns``, then ends with reward 1."""

    def __init__(self, turns=3, tool=False):
        self.turns, self.tool, self.k = turns, tool, 0
        self.tools = [CALCULATOR] if tool else []

    def reset(self, row):
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, message):
        self.k += 1
        if self.k >= self.turns:
            return StepResult(None, 1.0, True, {"tool_calls": 0.0})
        if self.tool:
            obs = [{"role": "tool", "tool_call_id": f"call_{self.k}", "name": "calculator",
                    "content": str(40 + self.k)}]
        else:
            obs = [{"role": "user", "content": f"Again, turn {self.k}."}]
        return StepResult(obs, 0.0, False, {"tool_calls": 1.0})


def _settings(**kw):
    return TurnSettings(**{"max_new_tokens": 40, "max_tokens": 2048, "temperature": 1.0, "top_p": 1.0,
                           "batch_size": 4, **kw})


@pytest.fixture(scope="module")
def embedded():
    from posttrain.models import load_model

    return load_model(None)


@pytest.mark.integration
@pytest.mark.parametrize("template", [None, "hermes-tools"])
def test_three_turn_trajectory_trains_exactly_the_sampled_ids(embedded, template):
    tok = embedded.tokenizer
    chat_template = template_text(template) if template else None
    engine = Recorder(HFEngine(embedded.model, tok))
    rows = [{"prompt": "Say hello in one word."}]
    trajs = run_trajectories(engine, tok, lambda: Chatter(3, tool=template is not None), rows, [0], [5], 1,
                             _settings(temperature=0.5), style="hermes" if template else None,
                             chat_template=chat_template)
    (traj,) = trajs
    assert traj.finished and traj.turns == 3 and traj.splits == 0 and traj.reward == 1.0
    (seg,) = traj.segments
    sampled = [ro.completion_ids[0] for _, ro in engine.calls]
    # Each turn's prompt was exactly the ids held so far.
    for k, (prompts, _) in enumerate(engine.calls):
        assert prompts[0] == seg.prompt_ids + seg.ids[:len(prompts[0]) - len(seg.prompt_ids)]
    # Position by position: sampled turn, environment delta, sampled turn, delta, sampled turn.
    at, expected_mask = 0, []
    for k, ids in enumerate(sampled):
        assert seg.ids[at:at + len(ids)] == ids
        assert seg.logprobs[at:at + len(ids)] == engine.calls[k][1].logprobs[0]
        at += len(ids)
        expected_mask += [True] * len(ids)
        if k < 2:
            held = seg.prompt_text + decode(tok, seg.ids[:at])
            full = render_prompt(tok, traj.messages[:2 * k + 3], chat_template, traj_tools(template))
            delta = encode(tok, full[len(held):])
            assert seg.ids[at:at + len(delta)] == delta
            text = decode(tok, delta)
            if template is None:  # ChatML framing of the user reply, written out by hand
                assert text == CHATML_REPLY.format(f"Again, turn {k + 1}.")
            else:
                assert f"<tool_response>\n{41 + k}\n</tool_response>" in text and text.endswith("assistant\n")
            at += len(delta)
            expected_mask += [False] * len(delta)
    assert at == len(seg.ids) and seg.sampled == expected_mask


def traj_tools(template):
    return [CALCULATOR] if template else None


DROPS_THINK = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template, splits", [(DROPS_THINK, 1), (None, 0)])
def test_a_template_that_drops_think_blocks_splits_the_trajectory(tokenizer, template, splits):
    engine = Scripted(tokenizer, ["<think>let me see</think>Hi<|im_end|>", "Bye<|im_end|>"])
    (traj,) = run_trajectories(engine, tokenizer, lambda: Chatter(2), [{"prompt": "Hello"}], [0], [0], 1,
                               _settings(), style=None, chat_template=template)
    assert traj.splits == splits and len(traj.segments) == splits + 1 and traj.reward == 1.0
    first, last = traj.segments[0], traj.segments[-1]
    assert first.ids[:len(encode(tokenizer, "<think>let me see</think>Hi<|im_end|>"))] == \
        encode(tokenizer, "<think>let me see</think>Hi<|im_end|>")
    if splits:
        # The second sample starts from the template's own rendering (think dropped), as context, then the turn.
        assert "let me see" not in last.prompt_text and last.prompt_text.endswith("<|im_start|>assistant\n")
        assert last.ids == encode(tokenizer, "Bye<|im_end|>") and all(last.sampled)
        assert first.sampled == [True] * len(first.ids)  # nothing after the split point is in the first sample
    else:
        assert sum(first.sampled) == len(encode(tokenizer, "<think>let me see</think>Hi<|im_end|>")) + \
            len(encode(tokenizer, "Bye<|im_end|>"))


def test_a_calculator_trajectory_in_the_tool_env(tokenizer):
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "347 * 28"}}\n</tool_call><|im_end|>'
    engine = Scripted(tokenizer, [call, "The answer is 9716.<|im_end|>"])
    (traj,) = run_trajectories(engine, tokenizer, lambda: ToolEnv(["calculator"]), [{"prompt": "q", "answer": "9716"}],
                               [0], [0], 1, _settings(), style="hermes", chat_template=template_text("hermes-tools"))
    assert traj.reward == 1.0 and traj.turns == 2 and traj.splits == 0 and traj.info["tool_calls"] == 1
    assert traj.messages[2]["role"] == "tool" and traj.messages[2]["content"] == "9716"
    seg = traj.segments[0]
    env_text = decode(tokenizer, [t for t, s in zip(seg.ids, seg.sampled) if not s])
    assert "9716" in env_text and "calculator" not in env_text  # the result is context, the call is sampled


def test_a_turn_cut_at_max_new_tokens_ends_with_reward_zero(tokenizer):
    class Cut(Scripted):
        def sample(self, prompt_ids, **kw):
            ro = super().sample(prompt_ids, **kw)
            ro.finished = [False] * len(prompt_ids)
            return ro

    (traj,) = run_trajectories(Cut(tokenizer, ["The answer is"]), tokenizer, lambda: Chatter(2),
                               [{"prompt": "q"}], [0], [0], 1, _settings(), style=None, chat_template=None)
    assert not traj.finished and traj.reward == 0.0 and traj.turns == 1


def test_multi_turn_grpo_masks_environment_tokens(tiny_dir, tokenizer, tmp_path):
    from posttrain.methods.agent import AgentBatches, AgentSetup, samples
    from posttrain.methods.grpo import GRPO
    from posttrain.models import load_model
    from posttrain.rollout.schedule import RolloutSchedule
    from tests.helpers import grpo_params

    loaded = load_model(tiny_dir)
    rows = [{"prompt": f"Question {i}"} for i in range(4)]
    params = grpo_params(group_size=2, max_new_tokens=6, kl_coef=0.0)
    seen = []
    setup = AgentSetup(lambda: Chatter(3), None, None, 512)
    batches = AgentBatches(setup, params, None, record=lambda trajs, k: seen.append((trajs, k)))
    prompts = [encode(tokenizer, r["prompt"]) for r in rows]
    engine = Scripted(tokenizer, ["Hi there<|im_end|>", "Sure<|im_end|>", "Done<|im_end|>"])
    schedule = RolloutSchedule(loaded.model, tokenizer, prompts, rows, [[]] * 4, make_batches=batches,
                               prompts_per_step=2, mu=1, micro_batch_size=3, seed=0, engine=engine)
    out = schedule.step(0)
    (trajs, k), = seen
    assert k == 0 and len(trajs) == 4
    ro, owner, sampled = samples(trajs)
    masks = torch.cat([b["completion_mask"].flatten() for b in out])
    at = 0
    for b in out:
        for i in range(b["completion_mask"].shape[0]):
            flags = sampled[at + i]
            row = b["completion_mask"][i]
            assert row[:len(flags)].tolist() == flags and not row[len(flags):].any()
        at += b["completion_mask"].shape[0]
    assert at == len(owner) and masks.sum() == sum(sum(s) for s in sampled)
    assert sum(sum(s) for s in sampled) < sum(len(s) for s in sampled)  # there are environment tokens
    loss, metrics = GRPO(params).loss_sum(loaded.model, out[0])
    assert torch.isfinite(loss) and "agent/turns" in metrics and "agent/splits" in metrics
    assert json.dumps(metrics)
