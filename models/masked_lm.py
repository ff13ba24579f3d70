"""BERT for masked language modelling, as Hugging Face's ``BertForMaskedLM``.

Padding is handled by removing it: the flash path packs the real tokens of each sequence and runs
the kernel's variable-length mode, so no (N x N) padding mask is ever built.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .flops import flops_per_token
from .layers import Block, run_blocks
from .loss import lm_loss


class MaskedLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "bert":
            raise ValueError(f"MaskedLM builds bert models, not {config.arch!r}")
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab, config.d_model)
        self.positions = nn.Embedding(config.max_seqlen, config.d_model)
        self.token_types = nn.Embedding(config.type_vocab_size, config.d_model)
        self.embed_norm = nn.LayerNorm(config.d_model, eps=config.eps)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        # MLM head: dense + GELU + LayerNorm, then the decoder tied to the word embedding, plus a bias.
        self.head_dense = nn.Linear(config.d_model, config.d_model)
        self.head_norm = nn.LayerNorm(config.d_model, eps=config.eps)
        self.head_bias = nn.Parameter(torch.zeros(config.padded_vocab))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, *, targets=None):
        """input_ids (B, N) -> logits (B, N, vocab), or with ``targets`` (B, N; -100 where no loss)
        the mean cross entropy, computed inside the model so that a compiled model fuses it.
        ``attention_mask`` (B, N): 1 for real tokens, 0 for (right) padding; padded positions'
        logits are meaningless."""
        batch, seqlen = input_ids.shape
        if seqlen > self.config.max_seqlen:
            raise ValueError(f"sequence of {seqlen} tokens exceeds the model's {self.config.max_seqlen} "
                             "positions (see models.extend_context)")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(seqlen, device=input_ids.device)
        x = self.embed(input_ids) + self.positions(positions) + self.token_types(token_type_ids)
        x = self.dropout(self.embed_norm(x))
        key_padding = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_padding = attention_mask.bool()
        x = run_blocks(self.blocks, x, self.config, self.training, key_padding)
        x = self.head_norm(F.gelu(self.head_dense(x)))
        logits = F.linear(x, self.embed.weight, self.head_bias)     # (B, N, padded vocabulary)
        if targets is not None:
            return lm_loss(logits, targets, self.config.vocab_size,
                           aligned=torch.compiler.is_compiling())
        return logits[..., :self.config.vocab_size]

    def flops_per_token(self, seqlen: int) -> float:
        return flops_per_token(self.config, seqlen)
