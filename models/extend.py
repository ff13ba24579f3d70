"""Extending a trained model's context for long-document fine-tuning."""

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def extend_context(model: nn.Module, max_seqlen: int,
                   method: Literal["copy", "interpolate", "ntk"] = "copy") -> nn.Module:
    """Give ``model`` ``max_seqlen`` positions, in place.

    Learned positions (GPT-2, BERT): ``copy`` tiles the trained table (position p starts from the
    embedding of p mod the old length, as the FlashAttention paper did for its long-document
    fine-tuning); ``interpolate`` stretches it linearly. Rotary models: ``ntk`` raises the rotary
    base so that the slowest frequencies stretch by new/old while the fastest stay as trained
    (base × s^(d/(d-2)), "NTK-aware" scaling), which keeps short-range attention intact;
    ``interpolate`` (and ``copy``, which has no table to tile here) scales every position by old/new
    (position interpolation, Chen et al. 2023).
    """
    config = model.config
    old = config.max_seqlen
    if max_seqlen <= old:
        raise ValueError(f"max_seqlen {max_seqlen} must exceed the current {old}")
    if config.arch == "rope":
        stretch = max_seqlen / old
        if method == "ntk":
            head_dim = config.head_dim
            theta = config.rope_theta * stretch ** (head_dim / (head_dim - 2))
            model.config = config.with_(max_seqlen=max_seqlen, rope_theta=theta)
        else:
            model.config = config.with_(max_seqlen=max_seqlen, rope_scaling=config.rope_scaling * stretch)
        for block in model.blocks:
            block.attn.config = model.config
            block.attn.rotary.set_frequencies(model.config.rope_theta, model.config.rope_scaling)
        return model
    if method == "ntk":
        raise ValueError("extend method 'ntk' scales rotary frequencies; this model has learned "
                         "positions: use copy or interpolate")
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
