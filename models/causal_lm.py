"""Decoder-only language models: GPT-2 (learned positions, LayerNorm, GELU) and the rotary decoder
(no position table, RMSNorm, SwiGLU, grouped-query attention). One class, chosen by ``config.arch``."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import LayerCache
from .config import ModelConfig
from .flops import flops_per_token
from .layers import Block, make_norm, run_blocks
from .loss import lm_loss, padding_bias


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch not in ("gpt2", "rope"):
            raise ValueError(f"CausalLM builds gpt2 or rope models, not {config.arch!r}")
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab, config.d_model)
        self.positions = nn.Embedding(config.max_seqlen, config.d_model) if config.arch == "gpt2" else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.norm = make_norm(config)
        # Untied (Llama 2, Llama 3 8B): a head of its own, laid out like the embedding.
        self.head = None if config.tie_embeddings else nn.Linear(config.d_model, config.padded_vocab,
                                                                 bias=False)
        # 0 for the vocabulary's columns, -inf for the padding's: the compiled loss's mask, added as
        # the head matmul's bias (see forward). A constant, so not saved with the weights.
        self.register_buffer("vocab_padding", padding_bias(config.padded_vocab, config.vocab_size)
                             if config.padded_vocab > config.vocab_size else None, persistent=False)

    def forward(self, input_ids, attention_mask=None, *, caches=None, cu_seqlens=None, max_seqlen=None,
                targets=None):
        """input_ids (B, N) -> logits (B, N, vocab), or with ``targets`` (B, N) the mean cross
        entropy (a scalar). ``attention_mask`` (B, N), 1 for real tokens and 0 for right padding;
        ``caches`` (from ``make_caches``) for incremental decoding; ``cu_seqlens``/``max_seqlen``:
        documents packed along the flattened B·N tokens, attended separately (flash attention's
        variable-length mode).

        Computing the loss here puts it inside ``torch.compile``'s graph when the model is compiled:
        the float32 (B, N, vocab) logits are then never materialized (1.9x less peak memory for
        GPT-2 small at 16K tokens per micro-batch, docs/results/train_notes.md)."""
        batch, seqlen = input_ids.shape
        offset = caches[0].length if caches else 0
        x = self.embed(input_ids)
        if self.positions is not None:
            if offset + seqlen > self.config.max_seqlen:
                raise ValueError(f"sequence of {offset + seqlen} tokens exceeds the model's "
                                 f"{self.config.max_seqlen} positions (see models.extend_context)")
            x = x + self.positions(torch.arange(offset, offset + seqlen, device=input_ids.device))
        x = self.dropout(x)
        key_padding = None
        if attention_mask is not None and caches is None and not bool(attention_mask.all()):
            key_padding = attention_mask.bool()
        documents = (cu_seqlens, max_seqlen) if cu_seqlens is not None else None
        x = run_blocks(self.blocks, x, self.config, self.training, key_padding, caches, documents)
        x = self.norm(x)
        if targets is not None and self.vocab_padding is not None and torch.compiler.is_compiling():
            # Compiled, the padded columns are masked in the head matmul's epilogue, leaving the
            # loss kernels those of an unmasked loss over aligned rows; lm_loss's masked_fill
            # costs 0.45 ms more per GPT-2 small 4K step (H200, docs/results/train_notes.md).
            logits = F.linear(x, self.head_weight, self.vocab_padding.to(x.dtype))
            return lm_loss(logits, targets)
        # Padded vocabulary rows are dropped from the logits.
        logits = F.linear(x, self.head_weight)                      # (B, N, padded vocabulary)
        if targets is not None:
            return lm_loss(logits, targets, self.config.vocab_size)
        return logits[..., :self.config.vocab_size]

    @property
    def head_weight(self) -> torch.Tensor:
        """The output head: the embedding itself when tied (GPT-2), else the head's own."""
        return self.embed.weight if self.head is None else self.head.weight

    def make_caches(self, batch: int, max_len: int) -> list[LayerCache]:
        config = self.config
        return [LayerCache(batch, max_len, config.kv_heads, config.head_dim, self.embed.weight.device)
                for _ in range(config.n_layer)]

    def flops_per_token(self, seqlen: int) -> float:
        return flops_per_token(self.config, seqlen)
