"""Extending a trained model's context for long-document fine-tuning."""

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def extend_context(model: nn.Module, max_seqlen: int,
                   method: Literal["copy", "interpolate"] = "copy") -> nn.Module:
    """Give ``model`` ``max_seqlen`` positions, in place.

    Learned positions (GPT-2, BERT): ``copy`` tiles the trained table (position p starts from the
    embedding of p mod the old length, as the FlashAttention paper did for its long-document
    fine-tuning); ``interpolate`` stretches it linearly. Rotary models: positions are scaled by
    new/old (position interpolation), whatever ``method`` says.
    """
    config = model.config
    old = config.max_seqlen
    if max_seqlen <= old:
        raise ValueError(f"max_seqlen {max_seqlen} must exceed the current {old}")
    if config.arch == "rope":
        model.config = config.with_(max_seqlen=max_seqlen, rope_scaling=config.rope_scaling * max_seqlen / old)
        for block in model.blocks:
            block.attn.config = model.config
            block.attn.rotary.scaling = model.config.rope_scaling
        return model
    table = model.positions.weight
    if method == "copy":
        repeats = -(-max_seqlen // old)
        new_table = table.repeat(repeats, 1)[:max_seqlen]
    elif method == "interpolate":
        new_table = F.interpolate(table.T[None].float(), size=max_seqlen, mode="linear",
                                  align_corners=True)[0].T.to(table.dtype)
    else:
        raise ValueError(f"unknown method {method!r}; use copy or interpolate")
    model.positions = nn.Embedding(max_seqlen, table.shape[1], device=table.device, dtype=table.dtype)
    model.positions.weight.copy_(new_table)
    model.config = config.with_(max_seqlen=max_seqlen)
    return model
