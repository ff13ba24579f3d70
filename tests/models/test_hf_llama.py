"""Llama-architecture interchange (models/hf_llama.py): the rotary decoder against transformers'
LlamaForCausalLM, both ways, from small random configs (no downloads)."""

import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from models import load_hf, load_model, save_hf, save_model

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def _llama(tmp_path, tie=False, rope_scaling=None, kv_heads=2, **extra):
    """A random LlamaForCausalLM written to ``tmp_path`` (float32, eager attention)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         rope_theta=5000.0, rope_scaling=rope_scaling, tie_word_embeddings=tie,
                         rms_norm_eps=1e-6, **extra)
    reference = LlamaForCausalLM(config).eval()
    reference.config._attn_implementation = "eager"
    reference.save_pretrained(tmp_path)
    return reference


def _tokens(length=96):
    return torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie, rope_scaling, kv_heads", [
    (False, None, 2), (True, None, 4), (True, LLAMA3, 2), (False, {"rope_type": "linear", "factor": 2.0}, 1)],
    ids=["untied-gqa", "tied-mha", "llama3-scaling", "linear-scaling-mqa"])
def test_llama_import_matches_transformers(tmp_path, tie, rope_scaling, kv_heads):
    reference = _llama(tmp_path, tie, rope_scaling, kv_heads)
    model = load_hf(tmp_path, attention="eager").eval()
    assert model.config.arch == "rope" and model.config.tie_embeddings == tie
    assert (model.head is None) == tie and model.config.kv_heads == kv_heads
    tokens = _tokens()
    with torch.no_grad():
        expected = reference(tokens).logits
        torch.testing.assert_close(model(tokens), expected, rtol=0, atol=1e-5)
        if rope_scaling is not None:
            # The scaling is what makes them agree: the same weights with plain rotary differ.
            plain = load_hf(tmp_path, attention="eager", rope_llama3=None, rope_scaling=1.0).eval()
            assert (plain(tokens) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "pad_vocab_multiple": 64},
                                       {"rope_llama3": (8.0, 1.0, 4.0, 16), "rope_theta": 5e5}],
                         ids=["tied", "untied-padded", "llama3"])
def test_rotary_decoder_exports_as_llama(tmp_path, tiny, overrides):
    model = tiny("rope", attention="eager", max_seqlen=128, **overrides).eval()
    if not model.config.tie_embeddings:
        with torch.no_grad():    # an untied head differs from the embedding
            model.head.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
    save_hf(model, tmp_path / "out")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, model(tokens), rtol=0, atol=1e-5)
        again = load_hf(tmp_path / "out", attention="eager").eval()
        torch.testing.assert_close(again(tokens), model(tokens), rtol=0, atol=0)


def test_mistral_sliding_window_both_ways(tmp_path, tiny):
    # Mistral's window counts the query itself, as attn_window does: 16 and 16 agree, 15 does not.
    torch.manual_seed(0)
    reference = MistralForCausalLM(MistralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, sliding_window=16)).eval()
    reference.config._attn_implementation = "eager"
    reference.save_pretrained(tmp_path / "mistral")
    model = load_hf(tmp_path / "mistral", attention="eager").eval()
    assert model.config.attn_window == 16 and model.config.global_every == 0
    tokens = _tokens(64)
    with torch.no_grad():
        expected = reference(tokens).logits
        torch.testing.assert_close(model(tokens), expected, rtol=0, atol=1e-5)
        narrower = load_hf(tmp_path / "mistral", attention="eager", attn_window=15).eval()
        assert (narrower(tokens) - expected).abs().max() > 1e-3
    local = tiny("rope", attention="eager", max_seqlen=128, attn_window=16).eval()
    save_hf(local, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "mistral"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, local(tokens), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="mixes local layers"):
        save_hf(tiny("rope", attn_window=16, global_every=2), tmp_path / "mixed")
    with pytest.raises(ValueError, match="GPT-2 and BERT classes cannot express"):
        save_hf(tiny("gpt2", attn_window=16), tmp_path / "gpt2")


def test_qwen2_biases_both_ways(tmp_path, tiny):
    torch.manual_seed(0)
    reference = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6, tie_word_embeddings=True)).eval()
    with torch.no_grad():    # fresh biases are zero: make them matter
        for name, value in reference.named_parameters():
            if name.endswith("_proj.bias"):
                value.normal_(0, 0.5)
    reference.config._attn_implementation = "eager"
    reference.save_pretrained(tmp_path / "qwen2")
    model = load_hf(tmp_path / "qwen2", attention="eager").eval()
    assert model.config.qkv_bias and model.config.tie_embeddings
    tokens = _tokens(64)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, rtol=0, atol=1e-5)
    biased = tiny("rope", attention="eager", qkv_bias=True).eval()
    with torch.no_grad():
        for block in biased.blocks:
            block.attn.qkv.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    save_hf(biased, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen2"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens[:, :48]).logits, biased(tokens[:, :48]), rtol=0, atol=1e-5)


def test_sharded_checkpoint_loads_and_a_missing_shard_is_named(tmp_path):
    reference = _llama(tmp_path / "whole")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    tokens = _tokens(24)
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "sharded", attention="eager").eval()(tokens),
                                   reference(tokens).logits, rtol=0, atol=1e-5)
    (tmp_path / "sharded" / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[1]):
        load_hf(tmp_path / "sharded")


def test_imported_llama_round_trips_through_a_model_file(tmp_path):
    _llama(tmp_path / "hf", rope_scaling=LLAMA3)
    model = load_hf(tmp_path / "hf", attention="eager").eval()
    save_model(model, tmp_path / "model.pt")
    again = load_model(tmp_path / "model.pt").eval()
    assert again.config == model.config
    tokens = _tokens(24)
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), model(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("change, named", [
    ({"hidden_act": "gelu"}, "hidden_act"), ({"attention_bias": True}, "biases"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16}, "Qwen2's sliding window"),
    ({"head_dim": 32}, "head_dim"), ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn")])
def test_what_the_decoder_cannot_express_is_refused_by_name(tmp_path, change, named):
    _llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=named):
        load_hf(tmp_path)


def test_a_null_head_dim_means_the_quotient(tmp_path):
    reference = _llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["head_dim"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokens = _tokens(24)
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path, attention="eager").eval()(tokens),
                                   reference(tokens).logits, rtol=0, atol=1e-5)


def test_export_refuses_llama3_scaling_with_position_interpolation(tmp_path, tiny):
    model = tiny("rope", rope_llama3=(8.0, 1.0, 4.0, 16), rope_scaling=2.0)
    with pytest.raises(ValueError, match="extend_method=ntk"):
        save_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_untied_heads_are_for_the_rotary_decoder_only(tiny):
    with pytest.raises(ValueError, match="tie_embeddings"):
        tiny("gpt2", tie_embeddings=False)
    with pytest.raises(ValueError, match="rope_llama3"):
        tiny("rope", rope_llama3=(8.0, 4.0, 1.0, 16))       # low_freq_factor above high
    with pytest.raises(ValueError, match="qkv_bias"):
        tiny("bert", qkv_bias=True)
