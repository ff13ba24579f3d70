"""Building blocks shared by every model: attention, MLP, norms, rotary embedding, one Block.

Compose, don't inherit: GPT-2 (pre-LN), BERT (post-LN) and the rotary decoder are the same Block
with different norm placement, norm type and MLP.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention, attention_qkv
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def make_norm(config: ModelConfig) -> nn.Module:
    if config.arch == "rope":
        return RMSNorm(config.d_model, config.eps)
    return nn.LayerNorm(config.d_model, eps=config.eps)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), half-split layout; ``scaling`` > 1 interpolates
    positions (Chen et al. 2023) to extend a trained context; ``llama3`` rescales each frequency as
    Llama 3 does (``llama3_frequencies``)."""

    def __init__(self, head_dim: int, theta: float, scaling: float, llama3: tuple | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.llama3 = llama3
        self.register_buffer("inv_freq", self._inverse_frequencies(theta), persistent=False)
        self.scaling = scaling

    def _inverse_frequencies(self, theta: float, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        inverse = 1.0 / theta ** exponents
        return inverse if self.llama3 is None else llama3_frequencies(inverse, *self.llama3)

    def set_frequencies(self, theta: float, scaling: float):
        """New base and interpolation factor (context extension; see models.extend_context)."""
        self.inv_freq = self._inverse_frequencies(theta, self.inv_freq.device)
        self.scaling = scaling

    def forward(self, x, offset: int):
        """x (B, N, H, D) rotated for positions offset..offset+N-1."""
        positions = torch.arange(offset, offset + x.shape[1], device=x.device, dtype=torch.float32)
        angles = torch.outer(positions / self.scaling, self.inv_freq)          # (N, D/2)
        cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
        first, second = x.float().chunk(2, dim=-1)
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        return rotated.to(x.dtype)


def llama3_frequencies(inverse: torch.Tensor, factor: float, low_freq_factor: float,
                       high_freq_factor: float, original_context: int) -> torch.Tensor:
    """Llama 3's rotary frequencies for a longer context: wavelengths that already exceed the
    original context / low_freq_factor slow down by ``factor``, those under original context /
    high_freq_factor (local detail) stay, and the band between blends the two linearly in
    original context / wavelength."""
    wavelength = 2 * math.pi / inverse
    blend = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    between = (1 - blend) * inverse / factor + blend * inverse
    return torch.where(wavelength > original_context / low_freq_factor, inverse / factor,
                       torch.where(wavelength < original_context / high_freq_factor, inverse, between))


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.config = config
        self.window = config.layer_window(layer)     # keys before the query a local layer sees
        heads = config.n_head + 2 * config.kv_heads
        bias = config.arch != "rope"
        # One fused projection: q, k and v are views of its output, read in place by the kernel.
        self.qkv = nn.Linear(config.d_model, heads * config.head_dim, bias=bias or config.qkv_bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=bias)
        self.rotary = (Rotary(config.head_dim, config.rope_theta, config.rope_scaling,
                              config.rope_llama3) if config.arch == "rope" else None)

    def forward(self, x, key_padding=None, cache=None, documents=None):
        config = self.config
        batch, seqlen, _ = x.shape
        qkv = self.qkv(x).view(batch, seqlen, config.n_head + 2 * config.kv_heads, config.head_dim)
        dropout_p = config.attn_dropout if self.training else 0.0
        if self.rotary is None and cache is None:
            out = attention_qkv(qkv, config.kv_heads, impl=config.attention, causal=config.causal,
                                dropout_p=dropout_p, key_padding=key_padding, documents=documents,
                                window=self.window)
            return self.proj(out.reshape(batch, seqlen, config.d_model))
        q, k, v = qkv.split([config.n_head, config.kv_heads, config.kv_heads], dim=2)
        offset = cache.length if cache is not None else 0
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        if cache is not None:
            k, v = cache.append(k, v)
        out = attention(q, k, v, impl=config.attention, causal=config.causal, dropout_p=dropout_p,
                        key_padding=key_padding, documents=documents, window=self.window)
        return self.proj(out.reshape(batch, seqlen, config.d_model))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.arch = config.arch
        if config.arch == "rope":   # SwiGLU (Shazeer 2020): gate and up projections fused
            self.fc = nn.Linear(config.d_model, 2 * config.ff_dim, bias=False)
            self.out = nn.Linear(config.ff_dim, config.d_model, bias=False)
        else:
            self.fc = nn.Linear(config.d_model, config.ff_dim)
            self.out = nn.Linear(config.ff_dim, config.d_model)

    def forward(self, x):
        hidden = self.fc(x)
        if self.arch == "rope":
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        elif self.arch == "gpt2":
            hidden = F.gelu(hidden, approximate="tanh")    # GPT-2's "gelu_new"
        else:
            hidden = F.gelu(hidden)                        # BERT: exact erf GELU
        return self.out(hidden)


class Block(nn.Module):
    """x + Attn(norm(x)), x + MLP(norm(x)) (pre-norm), or norm(x + Attn(x)), ... (post-norm, BERT)."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.pre_norm = config.arch != "bert"
        self.attn = SelfAttention(config, layer)
        self.mlp = MLP(config)
        self.norm_attn = make_norm(config)
        self.norm_mlp = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, key_padding=None, cache=None, documents=None):
        if self.pre_norm:
            x = x + self.dropout(self.attn(self.norm_attn(x), key_padding, cache, documents))
            return x + self.dropout(self.mlp(self.norm_mlp(x)))
        x = self.norm_attn(x + self.dropout(self.attn(x, key_padding, cache, documents)))
        return self.norm_mlp(x + self.dropout(self.mlp(x)))


def run_blocks(blocks, x, config: ModelConfig, training: bool, key_padding=None, caches=None,
               documents=None):
    """Apply the blocks, recomputing each in the backward when activation checkpointing is on.

    Checkpointing replays the block's forward, dropout included: torch.utils.checkpoint restores the
    RNG state, and the attention kernel draws its dropout seed from it, so the masks are identical.
    """
    for index, block in enumerate(blocks):
        cache = caches[index] if caches is not None else None
        if config.checkpoint_blocks and training and cache is None:
            x = torch.utils.checkpoint.checkpoint(block, x, key_padding, None, documents,
                                                  use_reentrant=False)
        else:
            x = block(x, key_padding, cache, documents)
    return x
