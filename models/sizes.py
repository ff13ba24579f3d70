"""Named model sizes. Vocabulary defaults are the original tokenizers'; pass vocab_size to override."""

from .config import ModelConfig

_SIZES = {
    # GPT-2 (Radford et al. 2019), as released: 1024 positions, vocabulary 50257.
    "gpt2_tiny": dict(arch="gpt2", d_model=128, n_layer=2, n_head=4, max_seqlen=1024, vocab_size=50257),
    "gpt2_small": dict(arch="gpt2", d_model=768, n_layer=12, n_head=12, max_seqlen=1024, vocab_size=50257),
    "gpt2_medium": dict(arch="gpt2", d_model=1024, n_layer=24, n_head=16, max_seqlen=1024, vocab_size=50257),
    "gpt2_large": dict(arch="gpt2", d_model=1280, n_layer=36, n_head=20, max_seqlen=1024, vocab_size=50257),
    "gpt2_xl": dict(arch="gpt2", d_model=1600, n_layer=48, n_head=25, max_seqlen=1024, vocab_size=50257),
    # BERT (Devlin et al. 2019): 512 positions, WordPiece vocabulary 30522, 2 token types.
    "bert_tiny": dict(arch="bert", d_model=128, n_layer=2, n_head=2, max_seqlen=512, vocab_size=30522),
    "bert_base": dict(arch="bert", d_model=768, n_layer=12, n_head=12, max_seqlen=512, vocab_size=30522),
    "bert_large": dict(arch="bert", d_model=1024, n_layer=24, n_head=16, max_seqlen=512, vocab_size=30522),
    # Rotary / RMSNorm / SwiGLU / grouped-query decoders for long context.
    "rope_tiny": dict(arch="rope", d_model=128, n_layer=2, n_head=4, n_kv_head=2, max_seqlen=4096,
                      vocab_size=50257, dropout=0.0, attn_dropout=0.0),
    "rope_small": dict(arch="rope", d_model=768, n_layer=12, n_head=12, n_kv_head=4, max_seqlen=8192,
                       vocab_size=50257, dropout=0.0, attn_dropout=0.0),
    "rope_1b": dict(arch="rope", d_model=2048, n_layer=16, n_head=32, n_kv_head=8, max_seqlen=8192,
                    vocab_size=50257, dropout=0.0, attn_dropout=0.0),
}


def named_config(name: str, **overrides) -> ModelConfig:
    """The config of a named size, with any field overridden (e.g. vocab_size, attention)."""
    if name not in _SIZES:
        raise ValueError(f"unknown model size {name!r}; known: {', '.join(sorted(_SIZES))}")
    return ModelConfig(**{**_SIZES[name], **overrides})


def size_names() -> list[str]:
    return sorted(_SIZES)
