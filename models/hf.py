"""Hugging Face interchange: build a flashtrain model from a local GPT-2, BERT, Llama, Mistral or
Qwen2 directory (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, whole or
sharded with an index), and write one back that ``transformers`` loads (``AutoModelForCausalLM``
/ ``AutoModelForMaskedLM``) with identical logits. Llama, Mistral and Qwen2 models become the rotary
decoder (``hf_llama.py``). Local files only: to start from the hub, download a directory first
(``huggingface-cli download``).
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .build import build_model
from .config import ModelConfig
from .hf_llama import llama_config, llama_export, llama_state


def _gpt2_config(hf: dict) -> ModelConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 checkpoints with activation {activation!r} are not supported (tanh GELU only)")
    return ModelConfig(arch="gpt2", vocab_size=hf["vocab_size"], max_seqlen=hf["n_positions"],
                       d_model=hf["n_embd"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                       d_ff=hf.get("n_inner") or 4 * hf["n_embd"], dropout=hf.get("resid_pdrop", 0.1),
                       attn_dropout=hf.get("attn_pdrop", 0.1),
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def _bert_config(hf: dict) -> ModelConfig:
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only BERT checkpoints with erf GELU and absolute positions are supported")
    return ModelConfig(arch="bert", vocab_size=hf["vocab_size"], max_seqlen=hf["max_position_embeddings"],
                       d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
                       n_head=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
                       dropout=hf.get("hidden_dropout_prob", 0.1),
                       attn_dropout=hf.get("attention_probs_dropout_prob", 0.1),
                       norm_eps=hf.get("layer_norm_eps", 1e-12),
                       type_vocab_size=hf.get("type_vocab_size", 2))


def _gpt2_names(config: ModelConfig) -> list[tuple[str, str, bool]]:
    """(ours, theirs, transposed): GPT-2 stores Linear weights as Conv1D, (in, out)."""
    names = [("embed.weight", "transformer.wte.weight", False),
             ("positions.weight", "transformer.wpe.weight", False),
             ("norm.weight", "transformer.ln_f.weight", False), ("norm.bias", "transformer.ln_f.bias", False)]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b, conv in (("norm_attn", "ln_1", False), ("norm_mlp", "ln_2", False),
                           ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
                           ("mlp.fc", "mlp.c_fc", True), ("mlp.out", "mlp.c_proj", True)):
            names += [(ours + a + ".weight", theirs + b + ".weight", conv),
                      (ours + a + ".bias", theirs + b + ".bias", False)]
    return names


def _bert_names(config: ModelConfig) -> list[tuple[str, str, bool]]:
    """(ours, theirs, _); the fused qkv is handled separately (HF keeps query/key/value apart)."""
    names = [("embed.weight", "bert.embeddings.word_embeddings.weight", False),
             ("positions.weight", "bert.embeddings.position_embeddings.weight", False),
             ("token_types.weight", "bert.embeddings.token_type_embeddings.weight", False),
             ("embed_norm.weight", "bert.embeddings.LayerNorm.weight", False),
             ("embed_norm.bias", "bert.embeddings.LayerNorm.bias", False),
             ("head_dense.weight", "cls.predictions.transform.dense.weight", False),
             ("head_dense.bias", "cls.predictions.transform.dense.bias", False),
             ("head_norm.weight", "cls.predictions.transform.LayerNorm.weight", False),
             ("head_norm.bias", "cls.predictions.transform.LayerNorm.bias", False),
             ("head_bias", "cls.predictions.bias", False)]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        for a, b in (("attn.proj", "attention.output.dense"), ("norm_attn", "attention.output.LayerNorm"),
                     ("mlp.fc", "intermediate.dense"), ("mlp.out", "output.dense"),
                     ("norm_mlp", "output.LayerNorm")):
            names += [(ours + a + ".weight", theirs + b + ".weight", False),
                      (ours + a + ".bias", theirs + b + ".bias", False)]
    return names


_QKV = ("query", "key", "value")


def _read_weights(path: Path) -> dict:
    """Every tensor of the checkpoint: one file, or the shards its index names (large models)."""
    from safetensors.torch import load_file
    read = {"safetensors": load_file,
            "bin": lambda file: torch.load(file, map_location="cpu", weights_only=True)}
    for suffix, load in read.items():
        single = path / ("model.safetensors" if suffix == "safetensors" else "pytorch_model.bin")
        if single.exists():
            return load(single)
        index = single.with_name(single.name + ".index.json")
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            absent = [shard for shard in shards if not (path / shard).exists()]
            if absent:
                raise FileNotFoundError(f"{path}: {index.name} names shards that are missing: {absent[:3]}")
            weights = {}
            for shard in shards:
                weights.update(load(path / shard))
            return weights
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (nor a sharded index)")


def load_hf(path, **overrides):
    """A flashtrain model with the weights of a local Hugging Face GPT-2, BERT, Llama, Mistral or
    Qwen2 directory.
    ``overrides`` change config fields (e.g. ``attention="sdpa"``)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    hf = json.loads((path / "config.json").read_text())
    kind = hf.get("model_type")
    if kind not in ("gpt2", "bert", "llama", "mistral", "qwen2"):
        raise ValueError(f"{path}: model_type {kind!r} is not supported; load_hf reads gpt2, bert, "
                         "llama, mistral and qwen2")
    if kind in ("llama", "mistral", "qwen2"):
        config = llama_config(hf, path).with_(**overrides)
        model = build_model(config, init=False)
        state = llama_state(config, _read_weights(path), path)
        _check_shapes(model, state, path)
        model.load_state_dict(state, strict=True)
        return model
    config = (_gpt2_config if kind == "gpt2" else _bert_config)(hf).with_(**overrides)
    weights = _read_weights(path)
    if kind == "gpt2" and not any(k.startswith("transformer.") for k in weights):
        weights = {"transformer." + k: v for k, v in weights.items()}   # a bare GPT2Model
    model = build_model(config, init=False)
    state = {}
    names = _gpt2_names(config) if kind == "gpt2" else _bert_names(config)
    missing = [theirs for _, theirs, _ in names if theirs not in weights]
    if kind == "bert":
        for i in range(config.n_layer):
            parts = [f"bert.encoder.layer.{i}.attention.self.{p}.{w}" for p in _QKV for w in ("weight", "bias")]
            missing += [p for p in parts if p not in weights]
            if all(p in weights for p in parts):
                state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([weights[p] for p in parts[0::2]])
                state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([weights[p] for p in parts[1::2]])
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    for ours, theirs, transposed in names:
        state[ours] = weights[theirs].t() if transposed else weights[theirs]
    _check_shapes(model, state, path)
    model.load_state_dict(state, strict=True)
    return model


def _check_shapes(model, state, path):
    expected = model.state_dict()
    wrong = [f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(expected[name].shape)}"
             for name, value in state.items() if name in expected and value.shape != expected[name].shape]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} tensor shapes differ from config.json:\n  " + "\n  ".join(wrong[:10]))


# The special tokens each architecture's tokenizer carries (trainer/data/tokenizer.py makes them).
# By role, the names it may have, first match taken.
_SPECIAL_TOKENS = {
    "gpt2": {"bos_token": ("<|endoftext|>",), "eos_token": ("<|endoftext|>",),
             "unk_token": ("<|endoftext|>",)},
    "bert": {"unk_token": ("[UNK]",), "sep_token": ("[SEP]",), "pad_token": ("[PAD]",),
             "cls_token": ("[CLS]",), "mask_token": ("[MASK]",)},
    # The rotary decoder: this project's tokenizers (<|endoftext|>), or a Llama model's own.
    "rope": {"bos_token": ("<|begin_of_text|>", "<s>", "<|endoftext|>"),
             "eos_token": ("<|endoftext|>", "<|end_of_text|>", "</s>"), "unk_token": ("<unk>",)},
}


def _tokenizer_files(tokenizer, config: ModelConfig) -> tuple[dict, dict]:
    """(file name -> text, config.json ids) that make ``AutoTokenizer.from_pretrained`` load the
    same tokenizer: tokenizer.json itself, plus the names of its special tokens."""
    from tokenizers import Tokenizer
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_file(str(tokenizer))
    special = {}
    for role, names in _SPECIAL_TOKENS[config.arch].items():
        present = [name for name in names if tokenizer.token_to_id(name) is not None]
        if present:
            special[role] = present[0]
    if config.causal and "eos_token" not in special:
        names = " or ".join(_SPECIAL_TOKENS[config.arch]["eos_token"])
        raise ValueError(f"the tokenizer has no {names} token, which a causal model's export needs as eos")
    ids = {f"{role[:-6]}_token_id": tokenizer.token_to_id(token) for role, token in special.items()
           if role in ("bos_token", "eos_token", "pad_token")}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_seqlen,
                        "clean_up_tokenization_spaces": False, **special}
    files = {"tokenizer.json": tokenizer.to_str(), "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
             "special_tokens_map.json": json.dumps(special, indent=2)}
    return files, ids


def _gpt2_bert_export(config: ModelConfig, ours: dict) -> tuple[dict, dict]:
    """(config.json, tensors) of a GPT2LMHeadModel or BertForMaskedLM equal to ``ours``."""
    vocab = config.vocab_size
    if config.arch == "gpt2":
        hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=vocab,
                  n_positions=config.max_seqlen, n_embd=config.d_model, n_layer=config.n_layer,
                  n_head=config.n_head, n_inner=config.ff_dim, activation_function="gelu_new",
                  layer_norm_epsilon=config.eps, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
                  attn_pdrop=config.attn_dropout, tie_word_embeddings=True,
                  bos_token_id=None, eos_token_id=None)
        names = _gpt2_names(config)
    else:
        hf = dict(model_type="bert", architectures=["BertForMaskedLM"], vocab_size=vocab,
                  hidden_size=config.d_model, num_hidden_layers=config.n_layer,
                  num_attention_heads=config.n_head, intermediate_size=config.ff_dim, hidden_act="gelu",
                  hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.attn_dropout,
                  max_position_embeddings=config.max_seqlen, type_vocab_size=config.type_vocab_size,
                  layer_norm_eps=config.eps, position_embedding_type="absolute", tie_word_embeddings=True)
        names = _bert_names(config)
        for i in range(config.n_layer):
            weight = ours[f"blocks.{i}.attn.qkv.weight"].chunk(3)
            bias = ours[f"blocks.{i}.attn.qkv.bias"].chunk(3)
            for part, w, b in zip(_QKV, weight, bias):
                ours[f"_hf.bert.encoder.layer.{i}.attention.self.{part}.weight"] = w
                ours[f"_hf.bert.encoder.layer.{i}.attention.self.{part}.bias"] = b
    tensors = {k[4:]: v for k, v in ours.items() if k.startswith("_hf.")}
    for mine, theirs, transposed in names:
        value = ours[mine]
        if mine in ("embed.weight", "head_bias"):
            value = value[:vocab]          # drop vocabulary padding rows
        tensors[theirs] = (value.t() if transposed else value).contiguous().clone()
    return hf, tensors


def save_hf(model, path, tokenizer=None) -> None:
    """Write ``model`` as a Hugging Face directory (config.json + model.safetensors), atomically:
    GPT-2 and BERT as themselves, the rotary decoder as a Llama model (Mistral with a sliding
    window, Qwen2 with q/k/v biases). With ``tokenizer`` (a
    ``tokenizers.Tokenizer`` or a tokenizer.json path) the directory also gets the tokenizer files
    and config.json the special token ids, so that ``AutoTokenizer`` and ``AutoModel*`` load a
    complete model from it."""
    from safetensors.torch import save_file
    config: ModelConfig = model.config
    if config.attn_window is not None and config.arch != "rope":
        raise ValueError(f"this model uses sliding-window attention (attn_window={config.attn_window}), "
                         "which the Hugging Face GPT-2 and BERT classes cannot express; keep model.pt")
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hf, tensors = (llama_export if config.arch == "rope" else _gpt2_bert_export)(config, ours)
    files = {}
    if tokenizer is not None:
        files, ids = _tokenizer_files(tokenizer, config)
        hf.update(ids)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (staging / "config.json").write_text(json.dumps(hf, indent=2))
        for name, text in files.items():
            (staging / name).write_text(text)
        save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
