"""Fine-tuning a Llama-architecture Hugging Face directory at a longer context, as a user would:
its weights and its own tokenizer (found next to it; documents end with </s>), the context
extended, the result sampled and exported back to transformers."""

import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from models import load_model
from trainer.data.tokenizer import special_ids
from trainer.loop import run

from .helpers import ROOT, compose_run, make_corpus, tiny_overrides


def _llama_directory(path, corpus):
    """A random Llama model with a SentencePiece-style tokenizer (<s> added in front of every
    text, </s> ending documents), trained on the corpus."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train([str(f) for f in sorted(corpus.iterdir())],
                    trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                        show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, rope_scaling={"rope_type": "llama3", "factor": 4.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 16})
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save(str(path / "tokenizer.json"))
    return tokenizer


def test_fine_tune_a_llama_directory_at_longer_context_then_sample_and_export(tmp_path):
    tokenizer = _llama_directory(tmp_path / "llama", make_corpus(tmp_path / "corpus"))
    assert special_ids(tokenizer)["eos"] == tokenizer.token_to_id("</s>")
    # No data.tokenizer_file: the model's own tokenizer.json, found next to it, is adopted.
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 2, "data.seqlen": 64,
                                            "model.init_from": str(tmp_path / "llama"),
                                            "model.extend_method": "ntk"})
    summary = run(compose_run(overrides), tmp_path / "run")
    assert summary["steps"] == 2
    assert "(model.init_from's own tokenizer)" in (tmp_path / "run" / "train.log").read_text()
    model = load_model(tmp_path / "run" / "model.pt").eval()
    config = model.config
    assert (config.arch, config.tie_embeddings, config.max_seqlen) == ("rope", False, 64)
    assert config.rope_llama3 == (4.0, 1.0, 4.0, 16) and config.rope_theta > 10000.0   # NTK-raised

    def script(*args):
        return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)

    sampled = script("scripts/sample.py", tmp_path / "run", "--prompt", "alpha beta", "--max-new-tokens",
                     "8", "--device", "cpu")
    assert sampled.returncode == 0 and sampled.stdout.strip(), sampled.stderr
    exported = script("scripts/convert_hf.py", "export", tmp_path / "run", tmp_path / "hf")
    assert exported.returncode == 0, exported.stderr
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert reference.config.eos_token_id == tokenizer.token_to_id("</s>")
    tokens = torch.tensor([tokenizer.encode("alpha beta gamma delta " * 8).ids])
    with torch.no_grad():
        ours = load_model(tmp_path / "run" / "model.pt", attention="eager").eval()(tokens)
        torch.testing.assert_close(reference(tokens).logits, ours, rtol=0, atol=1e-4)


def test_a_model_without_a_tokenizer_beside_it_is_refused_before_any_data_work(tmp_path):
    _llama_directory(tmp_path / "llama", make_corpus(tmp_path / "corpus"))
    (tmp_path / "llama" / "tokenizer.json").unlink()
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 1, "model.init_from": str(tmp_path / "llama")})
    with pytest.raises(ValueError, match="no tokenizer.json was found next to the model"):
        run(compose_run(overrides), tmp_path / "run")
    assert not (tmp_path / "cache").exists()     # nothing tokenized


def test_an_embedding_padded_past_its_tokenizer_trains_and_a_smaller_one_is_refused(tmp_path):
    tokenizer = _llama_directory(tmp_path / "llama", make_corpus(tmp_path / "corpus"))
    config = LlamaConfig.from_pretrained(tmp_path / "llama")
    for rows, name in ((tokenizer.get_vocab_size() + 7, "padded"), (tokenizer.get_vocab_size() - 1, "small")):
        config.vocab_size = rows
        LlamaForCausalLM(config).save_pretrained(tmp_path / name)
        tokenizer.save(str(tmp_path / name / "tokenizer.json"))
    overrides = lambda name: tiny_overrides(tmp_path, **{"trainer.max_steps": 1,
                                                         "model.init_from": str(tmp_path / name)})
    assert run(compose_run(overrides("padded")), tmp_path / "run")["steps"] == 1
    assert "the last 7 are never input" in (tmp_path / "run" / "train.log").read_text()
    with pytest.raises(ValueError, match="give the tokenizer the model was trained with"):
        run(compose_run(overrides("small")), tmp_path / "run_small")
