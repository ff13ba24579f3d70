"""Parity with Hugging Face transformers, both ways, from small random configs (no downloads)."""

import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, BertForMaskedLM,
                          GPT2Config, GPT2LMHeadModel)

from models import load_hf, save_hf


def _padding_mask():
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, 17:] = 0
    return mask


def test_gpt2_import(tmp_path, tokens):
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                           bos_token_id=0, eos_token_id=0)).eval()
    reference.save_pretrained(tmp_path)
    model = load_hf(tmp_path, attention="sdpa").eval()
    torch.testing.assert_close(model(tokens), reference(tokens).logits, rtol=0, atol=1e-5)


def test_gpt2_import_from_pytorch_bin(tmp_path, tokens):
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                           bos_token_id=0, eos_token_id=0)).eval()
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    model = load_hf(tmp_path, attention="eager").eval()
    torch.testing.assert_close(model(tokens), reference(tokens).logits, rtol=0, atol=1e-5)


def test_gpt2_export(tmp_path, tiny, tokens):
    model = tiny("gpt2", attention="sdpa").eval()
    save_hf(model, tmp_path / "out")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(exported(tokens).logits, model(tokens), rtol=0, atol=1e-5)


def test_bert_import(tmp_path, tokens):
    torch.manual_seed(0)
    reference = BertForMaskedLM(BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=256,
                                           max_position_embeddings=64)).eval()
    reference.save_pretrained(tmp_path)
    model = load_hf(tmp_path, attention="sdpa").eval()
    mask = _padding_mask()
    real = mask.bool()
    torch.testing.assert_close(model(tokens, mask)[real], reference(tokens, attention_mask=mask).logits[real],
                               rtol=0, atol=1e-5)


def test_bert_export(tmp_path, tiny, tokens):
    model = tiny("bert", attention="sdpa").eval()
    save_hf(model, tmp_path / "out")
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    mask = _padding_mask()
    real = mask.bool()
    torch.testing.assert_close(exported(tokens, attention_mask=mask).logits[real], model(tokens, mask)[real],
                               rtol=0, atol=1e-5)


def test_padded_vocabulary_round_trips(tmp_path, tiny, tokens):
    model = tiny("gpt2", attention="sdpa", pad_vocab_multiple=64).eval()
    assert model.embed.weight.shape[0] == 128 and model(tokens).shape[-1] == 97
    save_hf(model, tmp_path / "out")
    torch.testing.assert_close(load_hf(tmp_path / "out", attention="sdpa").eval()(tokens), model(tokens))


def test_unknown_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="mamba"):
        load_hf(tmp_path)


def test_missing_directory_and_weights_are_named(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "nowhere")
    save_hf(tiny("gpt2"), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(tmp_path / "m")


def test_shape_mismatch_lists_what_differs(tmp_path, tiny):
    save_hf(tiny("gpt2"), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["n_embd"] = 32
    config["n_head"] = 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shapes differ[\s\S]*transformer|checkpoint \(") as error:
        load_hf(tmp_path / "m")
    assert "blocks.0.attn.qkv.weight" in str(error.value)
