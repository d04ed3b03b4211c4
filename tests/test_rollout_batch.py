"""Rollout batches: a prompt shared by its completions gives the log-probs (and gradients) of each completion run
alone; sampling with one prefill per prompt gives what sampling each copy separately gives."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.data.collate import collate_rollouts
from posttrain.models.forward import token_logps
from posttrain.rollout.generate import stop_token_ids
from posttrain.rollout.sample import sample_completions
from tests.helpers import rollout_case


def alone(model, prompt, completion, temperature=1.0):
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]



@pytest.mark.parametrize("attn", ["sdpa_packed", "sdpa", "eager"])
def test_shared_prompt_logps_equal_each_completion_alone(tiny_dir, attn):
    from posttrain.models.attention import register

    register()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float64, attn_implementation=attn)
    prompts, comps = rollout_case()
    shared = collate_rollouts(prompts, comps, pad_id=0)
    assert shared["input_ids"].shape[0] == 2  # one row per prompt
    assert int(shared["num_tokens"]) == 7 + 3 + 5 + 1 + 4 + 2 + 4
    with torch.no_grad():
        out = token_logps(model, shared, temperature=0.7)
        plain = token_logps(model, collate_rollouts(prompts, comps, pad_id=0, share_prompt=False), temperature=0.7)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        assert torch.allclose(out[i, :len(c)], alone(model, p, c, 0.7), atol=1e-9)
        assert float(out[i, len(c):].abs().sum()) == 0.0 and int(shared["completion_mask"][i].sum()) == len(c)
    assert torch.allclose(out, plain, atol=1e-9)


def test_shared_prompt_gradients_equal_unshared(tiny_dir):
    prompts, comps = rollout_case()
    weights = torch.randn(5, 5, generator=torch.Generator().manual_seed(2))
    grads = []
    for share in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
        batch = collate_rollouts(prompts, comps, pad_id=0, share_prompt=share)
        (token_logps(model, batch) * weights * batch["completion_mask"]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_one_prefill_per_prompt_samples_what_separate_copies_sample(tiny_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    prompts, _ = rollout_case()
    unique = [prompts[0], prompts[3]]
    greedy = sample_completions(model, tokenizer, unique, n=2, max_new_tokens=6, temperature=0.0, min_new_tokens=6)
    for p, c in zip(greedy.prompt_ids, greedy.completion_ids):
        ref = model.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                             min_new_tokens=6, eos_token_id=stop_token_ids(tokenizer, model))
        assert c == ref[0, len(p):].tolist()
    assert greedy.prompt_ids == [unique[0], unique[0], unique[1], unique[1]]


def test_draw_samples_the_tempered_distribution_and_its_nucleus():
    from posttrain.rollout.sample import draw

    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05])
    logits = probs.clamp_min(1e-30).log().expand(40000, 5)
    freq = torch.bincount(draw(logits, 1.0), minlength=5).float() / 40000
    assert torch.allclose(freq, probs, atol=0.01) and freq[2] == 0  # ~4 standard errors
    # temperature 2 flattens: p ~ sqrt(probs), renormalised
    t2 = probs.sqrt() / probs.sqrt().sum()
    assert torch.allclose(torch.bincount(draw(logits, 2.0), minlength=5).float() / 40000, t2, atol=0.01)
    # top_p 0.7: 0.5 + 0.3 cross it, the rest are cut; renormalised to 0.625 / 0.375
    nucleus = torch.bincount(draw(logits, 1.0, top_p=0.7), minlength=5).float() / 40000
    assert torch.allclose(nucleus, torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.01)
    assert draw(logits[:3], 0.0).tolist() == [0, 0, 0]


def test_sampling_stops_at_end_of_turn_and_respects_min_new_tokens(tiny_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    stops = stop_token_ids(tokenizer, model)

    def favour_stop(module, inputs, out):  # make the end-of-turn token overwhelmingly likely
        out[..., stops[0]] += 100.0
        return out

    model.lm_head.register_forward_hook(favour_stop)
    prompts, _ = rollout_case()
    torch.manual_seed(0)
    ro = sample_completions(model, tokenizer, [prompts[0]], n=3, max_new_tokens=8, temperature=1.0, min_new_tokens=2)
    for c, done in zip(ro.completion_ids, ro.finished):
        assert len(c) >= 3 and c[-1] in stops and done and not any(t in stops for t in c[:-1])
