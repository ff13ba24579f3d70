"""Hugging Face interchange for the rotary decoder: Llama-architecture directories (``model_type``
``llama``: Llama 2 and 3, TinyLlama, SmolLM and others; ``mistral``, the same with a sliding
window; ``qwen2``, with biases on q, k and v) read into it and written back, so that a pretrained
model can be fine-tuned on long documents here and used in ``transformers`` afterwards.

The two layouts differ only in fusion: Hugging Face keeps q, k and v (and SwiGLU's gate and up)
as separate matrices, the rotary decoder holds each group as one projection, so the kernel reads
q, k and v in place from one matmul's output. Both rotate the two halves of each head (the
"rotate_half" layout) and normalize with RMSNorm in float32.
"""

import torch

from .config import ModelConfig

# Rotary frequency rules a checkpoint may name, and what this decoder does with each.
_ROPE_TYPES = ("default", "linear", "llama3")


def llama_config(hf: dict, path) -> ModelConfig:
    """The rotary decoder's config for a Llama, Mistral or Qwen2 ``config.json``; what it cannot
    express is refused by name rather than approximated."""
    refused = []
    kind = hf.get("model_type")
    if hf.get("hidden_act", "silu") != "silu":
        refused.append(f"hidden_act {hf['hidden_act']!r} (SwiGLU with SiLU only)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):   # Llama's attention_bias covers o_proj too
        refused.append("biases in the attention output or MLP projections")
    if kind == "qwen2" and hf.get("use_sliding_window"):
        refused.append("Qwen2's sliding window (its layers mix local and global attention)")
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    if (hf.get("head_dim") or head_dim) != head_dim:     # absent or null: the quotient
        refused.append(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads ({head_dim})")
    # transformers 5 writes rope_parameters (theta inside); earlier files rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        refused.append(f"rope type {rope_type!r} (supported: {', '.join(_ROPE_TYPES)})")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        refused.append("a partial rotary factor")
    if refused:
        raise ValueError(f"{path}: this {kind} checkpoint uses " + "; ".join(refused))
    # Mistral's window counts the query itself, as attn_window does (checked against transformers).
    window = hf.get("sliding_window") if kind == "mistral" else None
    llama3 = None
    if rope_type == "llama3":
        llama3 = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                  int(rope["original_max_position_embeddings"]))
    return ModelConfig(
        arch="rope", vocab_size=hf["vocab_size"], max_seqlen=hf["max_position_embeddings"],
        d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        d_ff=hf["intermediate_size"], dropout=0.0, attn_dropout=hf.get("attention_dropout", 0.0),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=float(rope["factor"]) if rope_type == "linear" else 1.0, rope_llama3=llama3,
        attn_window=window, qkv_bias=kind == "qwen2",
        # The default of all three configs is an untied head.
        tie_embeddings=hf.get("tie_word_embeddings", False))


def _plain_names(config: ModelConfig) -> list[tuple[str, str]]:
    """(ours, theirs) for the tensors that map one to one."""
    names = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
    if not config.tie_embeddings:
        names.append(("head.weight", "lm_head.weight"))
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        names += [(ours + "norm_attn.weight", theirs + "input_layernorm.weight"),
                  (ours + "norm_mlp.weight", theirs + "post_attention_layernorm.weight"),
                  (ours + "attn.proj.weight", theirs + "self_attn.o_proj.weight"),
                  (ours + "mlp.out.weight", theirs + "mlp.down_proj.weight")]
    return names


def _fused_names(config: ModelConfig, i: int) -> list[tuple[str, tuple[str, ...], list[int]]]:
    """(ours, the Hugging Face tensors it stacks in order, their rows) for layer ``i``."""
    theirs = f"model.layers.{i}."
    qkv_rows = [config.n_head * config.head_dim] + [config.kv_heads * config.head_dim] * 2
    names = [(f"blocks.{i}.attn.qkv.weight", tuple(theirs + f"self_attn.{p}_proj.weight" for p in "qkv"),
              qkv_rows),
             (f"blocks.{i}.mlp.fc.weight", (theirs + "mlp.gate_proj.weight", theirs + "mlp.up_proj.weight"),
              [config.ff_dim] * 2)]
    if config.qkv_bias:
        names.append((f"blocks.{i}.attn.qkv.bias", tuple(theirs + f"self_attn.{p}_proj.bias" for p in "qkv"),
                      qkv_rows))
    return names


def llama_state(config: ModelConfig, weights: dict, path) -> dict:
    """Our state dict from a Llama checkpoint's tensors (a bare LlamaModel's names lack the
    ``model.`` prefix and the head)."""
    if not any(name.startswith("model.") for name in weights):
        weights = {"model." + name: value for name, value in weights.items()}
    fused = [names for i in range(config.n_layer) for names in _fused_names(config, i)]
    wanted = [theirs for _, theirs in _plain_names(config)] + [t for _, parts, _ in fused for t in parts]
    missing = [name for name in wanted if name not in weights]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
    state = {ours: weights[theirs] for ours, theirs in _plain_names(config)}
    for ours, parts, _ in fused:
        state[ours] = torch.cat([weights[part] for part in parts])
    return state


def llama_export(config: ModelConfig, ours: dict) -> tuple[dict, dict]:
    """(config.json, tensors) of a LlamaForCausalLM equal to the rotary decoder ``ours`` (its
    state dict on the CPU); a MistralForCausalLM when every layer has the same sliding window, a
    Qwen2ForCausalLM when q, k and v have biases."""
    if config.attn_window is not None and config.global_every:
        raise ValueError(f"this model mixes local layers (attn_window={config.attn_window}) with global "
                         f"ones (every {config.global_every}th), which Hugging Face's Llama-family "
                         "classes cannot express; keep model.pt")
    if config.attn_window is not None and config.qkv_bias:
        raise ValueError("this model has a sliding window and q/k/v biases, which no Hugging Face "
                         "Llama-family class here expresses (Mistral has no biases, Qwen2 mixes "
                         "window layers); keep model.pt")
    if config.rope_llama3 is not None and config.rope_scaling != 1.0:
        raise ValueError("this model has both Llama 3 rotary scaling and position interpolation "
                         "(a context extension), which one Hugging Face rope_scaling cannot hold; "
                         "keep model.pt, or extend it with extend_method=ntk")
    rope_scaling = None
    if config.rope_llama3 is not None:
        factor, low, high, original = config.rope_llama3
        rope_scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": original}
    elif config.rope_scaling != 1.0:
        rope_scaling = {"rope_type": "linear", "factor": config.rope_scaling}
    kind = "qwen2" if config.qkv_bias else "llama" if config.attn_window is None else "mistral"
    hf = dict(model_type=kind, architectures=[f"{kind.capitalize()}ForCausalLM"], vocab_size=config.vocab_size,
              hidden_size=config.d_model, intermediate_size=config.ff_dim,
              num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
              num_key_value_heads=config.kv_heads, head_dim=config.head_dim, hidden_act="silu",
              max_position_embeddings=config.max_seqlen, rms_norm_eps=config.eps,
              rope_theta=config.rope_theta, rope_scaling=rope_scaling,
              tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False,
              attention_dropout=config.attn_dropout, bos_token_id=None, eos_token_id=None)
    if config.attn_window is not None:
        hf["sliding_window"] = config.attn_window
    tensors = {}
    for mine, theirs in _plain_names(config):
        value = ours[mine]
        if mine in ("embed.weight", "head.weight"):
            value = value[:config.vocab_size]      # drop vocabulary padding rows
        tensors[theirs] = value
    for i in range(config.n_layer):
        for mine, parts, rows in _fused_names(config, i):
            tensors.update(zip(parts, ours[mine].split(rows)))
    return hf, {name: value.contiguous().clone() for name, value in tensors.items()}
