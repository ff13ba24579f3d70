"""BERT for masked language modelling, as Hugging Face's ``BertForMaskedLM``.

Padding is handled by removing it: with flash attention the real tokens are packed once, after the
embeddings, and every layer runs the kernel's variable-length mode on them, so no (N x N) padding
mask is built and no layer computes on padding. With targets, the MLM head runs only on the
positions that carry a loss.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import resolve
from .config import ModelConfig
from .flops import flops_per_token
from .layers import Block, run_blocks
from .loss import IGNORE_INDEX, lm_loss


def positions_in_segments(cu_seqlens, total: int):
    """Each of ``total`` flattened tokens' offset from the start of its segment of ``cu_seqlens``."""
    flat = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    segment = torch.searchsorted(cu_seqlens, flat, right=True) - 1
    return (flat - cu_seqlens[segment]).long()


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

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, *, targets=None,
                max_targets=None, cu_seqlens=None, max_seqlen=None):
        """input_ids (B, N) -> logits (B, N, vocab), or with ``targets`` (B, N; -100 where no loss)
        the mean cross entropy, computed inside the model so that a compiled model fuses it.
        ``attention_mask`` (B, N): 1 for real tokens, 0 for (right) padding; padded positions'
        logits are meaningless. ``max_targets`` K: no row has more than K targets (the data's
        ``mlm_max_predictions``), so the head runs on a fixed B x K positions instead of a
        data-dependent selection (static shapes under torch.compile); the loss is the same.
        ``cu_seqlens`` (int32, ascending from 0 to B·N): rows packed with several sequences
        (``data.mlm_pack_sequences``); each segment of the flattened tokens attends only to itself
        and counts its positions from 0, so a packed sequence computes what it would alone
        (flash attention only; ``max_seqlen``: the longest segment, at most N)."""
        batch, seqlen = input_ids.shape
        if seqlen > self.config.max_seqlen:
            raise ValueError(f"sequence of {seqlen} tokens exceeds the model's {self.config.max_seqlen} "
                             "positions (see models.extend_context)")
        flash = resolve(self.config.attention, input_ids.device) == "flash"
        if cu_seqlens is not None and not flash:
            raise ValueError("packed sequences (cu_seqlens) need attention=flash, whose variable-length "
                             f"mode keeps them apart; this model's attention is {self.config.attention!r}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if cu_seqlens is None:
            positions = torch.arange(seqlen, device=input_ids.device)
        else:
            positions = positions_in_segments(cu_seqlens, batch * seqlen).view(batch, seqlen)
        x = self.embed(input_ids) + self.positions(positions) + self.token_types(token_type_ids)
        x = self.dropout(self.embed_norm(x))
        # Flash unpads whenever a mask is given, without asking whether the batch has padding: that
        # question is a host read (a sync, and a graph break under torch.compile), and unpadding a
        # batch without padding is one cheap gather. The masked paths drop an all-ones mask in eager
        # mode (the mask-free kernels are faster); compiled, they keep it, as Hugging Face's SDPA
        # path does, so the graph does not break on the host read.
        padded = attention_mask is not None and (
            flash or torch.compiler.is_compiling() or not bool(attention_mask.all()))
        if targets is not None and attention_mask is not None:
            # A target on padding is not scored, in any layout (nor held, when unpadded).
            targets = targets.masked_fill(attention_mask == 0, IGNORE_INDEX)
        rows = None                  # which of the B·N positions ``hidden`` holds (None: all)
        row_starts = None            # where each row starts in ``hidden`` (None: at b·N)
        if cu_seqlens is not None:
            # Packed rows: the batch's own segments, padding included, at the static B·N tokens.
            hidden = run_blocks(self.blocks, x.flatten(0, 1)[None], self.config, self.training,
                                documents=(cu_seqlens, max_seqlen or seqlen))[0]
        elif padded and flash and self.config.unpad:
            # Unpad once, here: the blocks run on the real tokens only, packed as one sequence of
            # documents for the kernel's variable-length mode (no per-layer gather and scatter).
            rows = attention_mask.flatten().nonzero().squeeze(1)
            lengths = attention_mask.sum(dim=1, dtype=torch.int32)
            cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
            packed = x.flatten(0, 1).index_select(0, rows)[None]
            row_starts = cu_seqlens[:-1].long()
            hidden = run_blocks(self.blocks, packed, self.config, self.training,
                                documents=(cu_seqlens, seqlen))[0]
        elif padded and flash:
            # The padded layout as documents: row b's real tokens [bN, bN + length) and its padding
            # [bN + length, (b+1)N) (empty for a full row), so real tokens never see padding.
            lengths = attention_mask.sum(dim=1, dtype=torch.int32)
            starts = torch.arange(batch, device=x.device, dtype=torch.int32) * seqlen
            bounds = torch.stack((starts, starts + lengths), dim=1).flatten()
            cu_seqlens = F.pad(bounds, (0, 1), value=batch * seqlen)
            hidden = run_blocks(self.blocks, x.flatten(0, 1)[None], self.config, self.training,
                                documents=(cu_seqlens, seqlen))[0]
        else:
            key_padding = attention_mask.bool() if padded else None
            hidden = run_blocks(self.blocks, x, self.config, self.training, key_padding).flatten(0, 1)
        if targets is not None and max_targets is not None:
            if row_starts is None:
                row_starts = torch.arange(batch, device=hidden.device) * seqlen
            return self._fixed_targets_loss(hidden, targets, row_starts, max_targets)
        if targets is not None:
            # The head (a d_model x vocab matmul, the largest of the model) only where there is a
            # loss: the ~15 % of positions that were masked.
            flat_targets = targets.flatten() if rows is None else targets.flatten().index_select(0, rows)
            scored = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
            logits = self._head(hidden.index_select(0, scored))[None]
            return lm_loss(logits, flat_targets.index_select(0, scored)[None], self.config.vocab_size,
                           aligned=torch.compiler.is_compiling())
        if rows is not None:
            hidden = hidden.new_zeros(batch * seqlen, hidden.shape[-1]).index_copy(0, rows, hidden)
        logits = self._head(hidden).view(batch, seqlen, -1)
        return logits[..., :self.config.vocab_size]

    def _fixed_targets_loss(self, hidden, targets, row_starts, max_targets: int):
        """The loss with the head on each row's first ``max_targets`` positions in target-first
        order (a stable sort: the targets, then filler positions whose target is -100)."""
        is_target = targets != IGNORE_INDEX
        if not torch.compiler.is_compiling():   # a device-side check: no host read
            torch._assert_async(is_target.sum(1).max() <= max_targets,
                                "a row has more targets than max_targets")
        count = min(max_targets, targets.shape[1])
        positions = torch.argsort((~is_target).to(torch.int8), dim=1, stable=True)[:, :count]
        picked = targets.gather(1, positions)
        # Filler positions past a packed row's end point into the next row (or past the last
        # token): their targets are -100, so only the index must stay in range.
        index = (row_starts[:, None] + positions).flatten().clamp(max=hidden.shape[0] - 1)
        logits = self._head(hidden.index_select(0, index))[None]
        return lm_loss(logits, picked.flatten()[None], self.config.vocab_size,
                       aligned=torch.compiler.is_compiling())

    def _head(self, x):
        """Dense + GELU + LayerNorm, then the decoder tied to the word embedding: (T, D) -> (T, V)."""
        x = self.head_norm(F.gelu(self.head_dense(x)))
        return F.linear(x, self.embed.weight, self.head_bias)

    def flops_per_token(self, seqlen: int, head_fraction: float = 1.0) -> float:
        """``head_fraction``: the share of positions the MLM head runs on when training (the
        masked ones, or a fixed count per row: ``trainer.fit_report.head_fraction``)."""
        return flops_per_token(self.config, seqlen, head_fraction)
