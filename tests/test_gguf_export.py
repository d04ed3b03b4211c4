"""GGUF export: the writer against transformers' GGUF reader on tiny Llamas (weights, the Q/K permutation, q8_0,
the tokenizer), the refusals, and `posttrain export --format gguf` end to end with its exit codes."""

import json

import pytest
import torch

from posttrain.cli import main
from posttrain.errors import ConfigError
from posttrain.models.gguf_write import QUANTS, check_exportable, permute_qk, quant_of, write_gguf
from posttrain.ship import CHECK_PROMPTS, EXPORT_FORMATS
from posttrain.ship.checks import prompt_ids
from tests.helpers import make_adapter, make_tiny, small_tokenizer


@pytest.fixture(scope="module")
def small_tok(tokenizer, tmp_path_factory):
    return small_tokenizer(tokenizer, tmp_path_factory.mktemp("small-tok"))


@pytest.fixture(scope="module")
def small_dir(small_tok, tmp_path_factory) -> str:
    return make_tiny(tmp_path_factory.mktemp("small-tiny"), small_tok, layers=2, hidden=64)


@pytest.fixture(scope="module")
def small_adapter(small_dir, tmp_path_factory):
    return make_adapter(small_dir, tmp_path_factory.mktemp("small-adapter") / "adapter", seed=3,
                        targets=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])


def _merged(base_dir, adapter):
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_adapter

    return load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter)).merge_and_unload().eval()


def _read_back(folder, file):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()


IDS = torch.tensor([[1, 200, 300, 400, 500, 600, 700, 800]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_permutation_interleaves_the_rotary_halves_of_each_head():
    # One head of 4 rows [a0 a1 | b0 b1] (HF: first half, second half) -> llama.cpp's pairs [a0 b0 a1 b1];
    # two heads permute each head on its own.
    w = torch.arange(8.0).reshape(8, 1)
    assert permute_qk(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert permute_qk(w, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_f16_file_reads_back_as_the_merged_weights(small_dir, small_adapter, small_tok, tmp_path):
    merged = _merged(small_dir, small_adapter)
    stored = write_gguf(merged, small_tok, tmp_path / "m.gguf", "f16")
    assert stored["tensor_types"] == {"F16": 2 * 7 + 1, "F32": 2 * 2 + 1}  # 7 linears a layer + embedding; norms
    back = _read_back(tmp_path, "m.gguf")
    want, got = merged.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for name, w in want.items():
        # f16 keeps 11 significant bits: a relative error of at most 2^-11 (norms are stored in f32: exact)
        bound = 0.0 if w.ndim == 1 else float(w.abs().max()) * 2 ** -11
        assert float((got[name] - w).abs().max()) <= bound, name
    assert back.config.tie_word_embeddings and back.config.num_key_value_heads == 2
    assert float((_logits(back) - _logits(merged)).abs().max()) < 1e-2


def test_without_the_qk_permutation_the_logits_break(small_dir, small_tok, tmp_path, monkeypatch):
    """The reader un-permutes q and k; a writer that skipped the permutation would scramble rotary attention."""
    from transformers import AutoModelForCausalLM

    import posttrain.models.gguf_write as gw

    model = AutoModelForCausalLM.from_pretrained(small_dir).eval()
    write_gguf(model, small_tok, tmp_path / "good.gguf", "f32")
    monkeypatch.setattr(gw, "permute_qk", lambda w, n: w)
    gw.write_gguf(model, small_tok, tmp_path / "bad.gguf", "f32")
    good, bad = _read_back(tmp_path, "good.gguf"), _read_back(tmp_path, "bad.gguf")
    q = model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(good.model.layers[0].self_attn.q_proj.weight, q)
    assert not torch.allclose(bad.model.layers[0].self_attn.q_proj.weight, q)
    # A random tiny model's logits span about 1, so the scrambled rotary attention moves them by ~7e-3 here:
    # 700 times the f32 file's own error.
    assert float((_logits(good) - _logits(model)).abs().max()) < 1e-5
    assert float((_logits(bad) - _logits(model)).abs().max()) > 1e-3


def test_q8_0_blocks_and_logits_within_tolerance(small_dir, small_adapter, small_tok, tmp_path):
    merged = _merged(small_dir, small_adapter)
    stored = write_gguf(merged, small_tok, tmp_path / "q.gguf", "q8_0")
    assert stored["tensor_types"] == {"Q8_0": 15, "F32": 5}
    back = _read_back(tmp_path, "q.gguf")
    for name, w in merged.state_dict().items():
        if w.ndim == 2:
            # q8_0: blocks of 32 along a row, scale d = max|x| / 127 (stored in f16), x ~ d * round(x / d):
            # the error is at most d / 2 per weight, plus the f16 rounding of d times 127.
            blocks = w.reshape(w.shape[0], -1, 32)
            d = blocks.abs().amax(dim=-1, keepdim=True) / 127
            err = (back.state_dict()[name].reshape(blocks.shape) - blocks).abs()
            assert bool((err <= d / 2 + d * 127 * 2 ** -11 + 1e-7).all()), name
    diff = (_logits(back) - _logits(merged)).abs()
    assert float(diff.mean()) < QUANTS["q8_0"].max_mean_logit_diff


@pytest.mark.parametrize("quant", ["q4_1", "q5_0"])
def test_a_model_read_from_a_quantized_file_re_exports_exactly(small_dir, small_tok, tmp_path, quant):
    """Weights already on a quant's grid come back bit for bit: what the 4/5-bit path writes (block layout, row
    order, the permuted q/k rows, the f16 scales) is what the reader takes. The embedded SmolLM2 is such a model
    for q4_1 (its file is Q4_1), so its q4_1 export reproduces it (benchmarks/RESULTS.md)."""
    from transformers import AutoModelForCausalLM

    write_gguf(AutoModelForCausalLM.from_pretrained(small_dir), small_tok, tmp_path / "a.gguf", quant)
    once = _read_back(tmp_path, "a.gguf")
    write_gguf(once, small_tok, tmp_path / "b.gguf", quant)
    twice = _read_back(tmp_path, "b.gguf")
    for name, w in once.state_dict().items():  # the embedding (kept in q8_0) too
        assert torch.equal(twice.state_dict()[name], w), name
    assert torch.equal(_logits(twice), _logits(once))


def test_real_tokenizer_ids_chat_template_and_token_types_round_trip(tokenizer, tiny_dir, tmp_path):
    """The full SmolLM2 tokenizer (49,152 tokens, 48,900 merges): same ids for the chat-rendered check prompts,
    the same template and special ids, its 17 added special tokens marked CONTROL for llama.cpp, and every
    llama/tokenizer key that llama.cpp's own converter wrote into the embedded model's GGUF present."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.gguf.reader import read_gguf_metadata

    from posttrain.models.loading import _embedded_gguf

    write_gguf(AutoModelForCausalLM.from_pretrained(tiny_dir), tokenizer, tmp_path / "t.gguf", "q8_0")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    assert prompt_ids(back, CHECK_PROMPTS) == prompt_ids(tokenizer, CHECK_PROMPTS)
    assert back.chat_template == tokenizer.chat_template
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (1, 2, 2)
    ours, _ = read_gguf_metadata(str(tmp_path / "t.gguf"))
    assert ours["tokenizer.ggml.token_type"][:17] == [3] * 17 and set(ours["tokenizer.ggml.token_type"][17:]) == {1}
    assert ours["tokenizer.ggml.pre"] == "gpt2" and ours["tokenizer.ggml.add_bos_token"] is False
    assert (ours["tokenizer.ggml.tokens"], ours["tokenizer.ggml.merges"]) == (49_152, 48_900)  # counts, as read
    theirs, _ = read_gguf_metadata(str(_embedded_gguf()))
    wanted = {k for k in theirs if k.startswith(("llama.", "tokenizer.")) and k != "tokenizer.ggml.add_space_prefix"}
    assert wanted <= set(ours), wanted - set(ours)
    assert ours["general.file_type"] == 7 and ours["general.quantization_version"] == 2  # MOSTLY_Q8_0


def test_k_quants_and_unknown_quants_are_refused_by_name():
    with pytest.raises(ConfigError, match="q4_k_m.*llama-quantize"):
        quant_of("q4_k_m")
    with pytest.raises(ConfigError, match="q3_0 is not a GGUF quantization"):
        quant_of("q3_0")
    assert quant_of("Q8_0") is QUANTS["q8_0"]


def test_non_llama_and_features_the_reader_drops_are_refused():
    from transformers import LlamaConfig, Qwen2Config

    with pytest.raises(ConfigError, match="this model is Qwen2ForCausalLM"):
        check_exportable(Qwen2Config(architectures=["Qwen2ForCausalLM"]))
    with pytest.raises(ConfigError, match="attention_bias"):
        check_exportable(LlamaConfig(attention_bias=True))
    with pytest.raises(ConfigError, match="rope scaling 'llama3'"):
        check_exportable(LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192}))
    check_exportable(LlamaConfig())


def test_cli_export_gguf_writes_a_checked_folder_and_exits_1_when_broken(small_adapter, tmp_path, monkeypatch,
                                                                          capsys):
    out = tmp_path / "gguf"
    # f32, the exact file: a random tiny model's logits span under 1 and its greedy tokens are near ties that even
    # f16's rounding flips (1 of 8 here); the f16 and q8_0 tolerances are measured on the trained embedded model.
    assert main(["export", str(small_adapter), "--format", "gguf", "--quant", "f32", "--out", str(out),
                 "--max-new-tokens", "8"]) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["COMPLETE", "README.md", "export_report.json", "model-f32.gguf"]
    check = report["gguf_vs_base_plus_adapter"]
    assert report["within_tolerance"] and report["failures"] == [] and check["prompts"] == 8
    assert check["greedy_identical"] == report["tolerance"]["min_greedy_identical"] == 8
    assert report["tokenizer"]["ids_identical"] == 8 and report["tokenizer"]["chat_template_identical"]
    assert report["bytes"] == (out / "model-f32.gguf").stat().st_size
    assert "llama.cpp" not in capsys.readouterr().out  # not installed here: that branch is tested below

    import posttrain.models.gguf_write as gw

    monkeypatch.setattr(gw, "permute_qk", lambda w, n: w)  # a broken writer must not pass its own check
    assert main(["export", str(small_adapter), "--format", "gguf", "--quant", "f32", "--out", str(out),
                 "--max-new-tokens", "8"]) == 1
    report = json.loads((out / "export_report.json").read_text())
    assert not report["within_tolerance"] and any("greedy" in f or "mean" in f for f in report["failures"])
    assert any("top-1 tokens" in f for f in report["failures"])
    assert "NOT within the f32 tolerance" in capsys.readouterr().out


def test_cli_refuses_before_loading(small_adapter, tmp_path, capsys):
    assert main(["export", str(small_adapter), "--format", "gguf", "--quant", "q4_k_m",
                 "--out", str(tmp_path / "x")]) == 2
    assert "llama-quantize" in capsys.readouterr().err
    assert main(["export", str(small_adapter), "--quant", "q8_0", "--out", str(tmp_path / "y")]) == 2
    assert "--quant: only with --format gguf" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_a_non_llama_base_is_refused_by_name_before_it_is_run(small_tok, tmp_path, capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(small_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, architectures=["Qwen2ForCausalLM"])
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    small_tok.save_pretrained(tmp_path / "qwen")
    adapter = make_adapter(str(tmp_path / "qwen"), tmp_path / "adapter", seed=0, targets=["q_proj"])
    assert main(["export", str(adapter), "--format", "gguf", "--out", str(tmp_path / "g")]) == 2
    assert "supports the Llama architecture; this model is Qwen2ForCausalLM" in capsys.readouterr().err


def test_export_format_table_matches_the_cli():
    from posttrain.cli import build_parser

    export = build_parser()._subparsers._group_actions[0].choices["export"]
    fmt = next(a for a in export._actions if a.dest == "format")
    assert sorted(fmt.choices) == sorted(EXPORT_FORMATS)


def test_llama_cpp_greedy_matches(small_adapter, tmp_path):
    pytest.importorskip("llama_cpp")
    from posttrain.ship import export_gguf

    report = export_gguf(str(small_adapter), str(tmp_path / "g"), quant="f16", max_new_tokens=8)
    assert report["llama_cpp"]["greedy_identical"] >= report["tolerance"]["min_greedy_identical"]


@pytest.mark.integration
def test_embedded_model_exports_to_f16_with_identical_greedy_answers(embedded_dir, tmp_path):
    from posttrain.ship import export_gguf

    # a small update (B ~ 0.02 N(0, 1)), as a short fine-tune makes; 0.5 would turn the real model into noise
    adapter = make_adapter(embedded_dir, tmp_path / "adapter", seed=0, targets=["q_proj", "v_proj"], scale=0.02)
    # 4 prompts x 8 tokens keeps it near a minute; benchmarks/gguf_quants.py measures all 8 x 32
    report = export_gguf(str(adapter), str(tmp_path / "gguf"), quant="f16", prompts=CHECK_PROMPTS[:4],
                         max_new_tokens=8)
    check = report["gguf_vs_base_plus_adapter"]
    assert report["within_tolerance"], report["failures"]
    assert check["greedy_identical"] == 4 and report["tokenizer"]["ids_identical"] == 4
    assert report["tensor_types"] == {"F16": 30 * 7 + 1, "F32": 30 * 2 + 1}


def test_top1_along_scores_each_answer_token_on_the_reference_prefix():
    """Hand-worked: a 2-token prompt and the 3-token answer [2, 0, 1]; the logits at positions 1, 2 and 3 predict
    them. The copy agrees at positions 1 and 3 and flips position 2, where the reference led 0.5 (3.0 vs 2.5)."""
    from posttrain.models.merge import top1_along

    want = torch.tensor([[9.0, 0.0, 0.0], [0.0, 1.0, 4.0], [3.0, 2.5, 0.0], [0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    got = want.clone()
    got[2] = torch.tensor([2.9, 3.0, 0.0])  # the runner-up overtakes by 0.1
    got[0] = torch.tensor([0.0, 0.0, 9.0])  # a prompt position: not scored
    agree, margins = top1_along(got, want, 2, [2, 0, 1])
    assert agree == 2 and margins == [pytest.approx(0.5)]
    assert top1_along(want, want, 2, [2, 0, 1]) == (3, [])


def _check(**over):
    c = {"prompts": 8, "greedy_identical": 3, "diverged_prompts": [0, 1, 3, 4, 6], "top1_agreement": 0.99,
         "top1_positions": 256, "top1_flipped_max_margin": 0.3, "mean_abs_logit_diff": 0.2, "max_abs_logit_diff": 1.5}
    return {**c, **over}


def test_q8_0_verdict_rests_on_teacher_forced_agreement_not_whole_answers():
    from posttrain.ship.gguf_export import verdict, warnings_of

    tokens = {"ids_identical": 8, "prompts": 8, "differing_prompts": [], "chat_template_identical": True,
              "special_tokens_identical": True, "special_token_ids": {}}
    q8 = QUANTS["q8_0"]
    ok, why = verdict(q8, _check(top1_agreement=q8.min_top1_agreement), tokens, None)
    assert ok and why == []  # 3/8 whole answers identical, each of their tokens still the top-1 often enough
    note = warnings_of(_check())
    assert "prompts [0, 1, 3, 4, 6] (5 of 8)" in note[0] and "99.00%" in note[0] and "0.3 logits" in note[0]
    ok, why = verdict(q8, _check(top1_agreement=q8.min_top1_agreement - 0.01), tokens, None)
    assert not ok and "top-1 tokens along the reference's answers agree at" in why[0]
    # f16 keeps whole-answer identity: its error is far below any margin a trained model's answers hold
    ok, why = verdict(QUANTS["f16"], _check(mean_abs_logit_diff=0.007), tokens, None)
    assert not ok and why == ["greedy continuations identical on 3/8 prompts; this quantization's tolerance is at "
                              "least 8"]
