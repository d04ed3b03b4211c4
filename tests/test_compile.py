"""model.compile: regionally compiled decoder layers give the eager loss and gradients, keep one set of graphs
across batch layouts, and decode eagerly."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.data import collate
from posttrain.methods import completion_loss_sum
from posttrain.models import apply_lora
from posttrain.models.attention import register
from posttrain.models.compile import compile_layers, is_compiled
from posttrain.rollout.sample import sample_completions
from tests.helpers import random_examples

pytestmark = pytest.mark.filterwarnings("ignore")


def lora_model(tiny_dir, compiled: bool):
    register()
    # fp32, what runs on a CPU: in fp64 the comparison would measure transformers' fp32 RMSNorm round trip, which
    # Inductor drops (the compiled model is the more precise one there).
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa_packed")
    torch.manual_seed(0)
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    for name, p in model.named_parameters():  # B starts at zero; a random B makes the LoRA gradients non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    if compiled:
        assert compile_layers(model) == 2 and is_compiled(model)
    return model


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = completion_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compiled_layers_give_the_eager_loss_and_gradients_without_recompiling(tiny_dir):
    from torch._dynamo.utils import counters

    exs = random_examples(12, 500, seed=3)
    batches = [collate([exs[0:3], exs[3:5]], pad_id=0), collate([exs[5:6], exs[6:9]], pad_id=0),
               collate([exs[9:11], exs[11:12]], pad_id=0)]
    eager, compiled = lora_model(tiny_dir, False), lora_model(tiny_dir, True)
    graphs = []
    for batch in batches:
        loss_e, grads_e = loss_and_grads(eager, batch)
        loss_c, grads_c = loss_and_grads(compiled, batch)
        assert torch.allclose(loss_c, loss_e, rtol=1e-6)
        assert grads_c.keys() == grads_e.keys() and len(grads_e) == 2 * 7 * 2
        for name, g in grads_e.items():
            assert float((grads_c[name] - g).abs().max()) <= 1e-5 * float(g.abs().max()), name
        graphs.append(counters["stats"]["unique_graphs"])
    # The second and third batches have other lengths and segment layouts: no new graphs.
    assert graphs[0] > 0 and graphs[2] == graphs[1] == graphs[0]


def test_compiled_layers_give_the_eager_shared_prompt_log_probs_and_gradients(tiny_dir):
    # The layout of GRPO groups and DPO pairs: prompt | branch | branch ..., attended through attention.Layout.
    from posttrain.data.collate import collate_rollouts
    from posttrain.models.forward import token_logps
    from tests.helpers import rollout_case

    prompts, comps = rollout_case()
    batch = collate_rollouts(prompts, comps, pad_id=0)
    weights = torch.randn(5, 5, generator=torch.Generator().manual_seed(2))
    out = []
    for compiled in (False, True):
        model = lora_model(tiny_dir, compiled)
        logp = token_logps(model, batch, temperature=0.7)
        (logp * weights * batch["completion_mask"]).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        with torch.no_grad(), model.disable_adapter():  # the reference's pass: no gradient, adapters off
            ref = token_logps(model, batch)
        out.append((logp.detach(), grads, ref))
    (logp_e, grads_e, ref_e), (logp_c, grads_c, ref_c) = out
    assert torch.allclose(logp_c, logp_e, atol=1e-5) and torch.allclose(ref_c, ref_e, atol=1e-5)
    assert float((grads_c - grads_e).abs().max()) <= 1e-5 * float(grads_e.abs().max())


def test_sampling_a_compiled_model_runs_eagerly_and_samples_the_same(tiny_dir, tokenizer):
    from torch._dynamo.utils import counters

    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    out = []
    for compiled in (False, True):
        model = lora_model(tiny_dir, compiled)
        torch.manual_seed(4)
        before = counters["stats"]["unique_graphs"]
        out.append(sample_completions(model, tokenizer, prompts, n=2, max_new_tokens=5,
                                      min_new_tokens=5).completion_ids)
        assert counters["stats"]["unique_graphs"] == before  # nothing compiled while decoding
    assert out[0] == out[1]


def test_liger_switch_says_what_is_missing_and_patches_the_base_model(tiny_dir, monkeypatch):
    import sys
    import types

    from posttrain.errors import KernelError
    from posttrain.models.kernels import KERNELS, apply_liger

    model = lora_model(tiny_dir, False)
    with pytest.raises(KernelError, match="Triton GPU kernels and the model is on cpu"):
        apply_liger(model, torch.device("cpu"))
    # Past the device check (no GPU here): a missing package, then a present one.
    cuda = torch.device("cuda")
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(KernelError, match="pip install liger-kernel"):
        apply_liger(model, cuda)
    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda model, **kw: calls.append((model, kw))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    assert apply_liger(model, cuda) == ["rope", "rms_norm", "swiglu"]
    (patched, kw), = calls
    assert patched is model.get_base_model() and kw == KERNELS
    assert not kw["fused_linear_cross_entropy"] and not kw["cross_entropy"]  # posttrain's own chunked loss stays


def test_compile_with_checkpointing_is_refused_instead_of_silently_eager():
    from posttrain.config import load_config
    from posttrain.errors import ConfigError

    cfg = load_config(None, ["data.train=x.jsonl", "model.compile=true"], method="sft")
    assert cfg.model.compile and not cfg.model.liger
    with pytest.raises(ConfigError, match="model.compile has no effect on layers under model.gradient_checkpointing"):
        load_config(None, ["data.train=x.jsonl", "model.compile=true", "model.gradient_checkpointing=true"],
                    method="sft")
