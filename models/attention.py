"""The three ways a model can compute attention, behind one function.

``flash``: ``kernels.flash_attention`` (Triton; CUDA, or the interpreter on CPU), reading q/k/v as
views of the fused projection; padding is removed and the sequences packed (``cu_seqlens``), so no
N x N mask exists. ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``. ``eager``: the
score matrix materialized, softmax(QKᵀ)V with an explicit mask, as Hugging Face's GPT-2 does: the
baseline of the FlashAttention paper. All take (batch, seqlen, heads, head_dim) tensors.
"""

import math

import torch
import torch.nn.functional as F

from kernels import flash_attention, flash_attention_qkvpacked, visible_mask


def resolve(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "flash" if device.type == "cuda" else "sdpa"
    return impl


def attention_qkv(qkv, heads_k: int, *, impl: str, causal: bool, dropout_p: float, key_padding=None,
                  documents=None, window: int | None = None):
    """``attention`` of a fused projection's output, qkv (B, N, Hq + 2·Hk, D): query heads, then key
    heads, then value heads. flash reads it whole and its compiled backward writes the projection's
    gradient in one piece (no concatenation of three gradients; ``kernels/qkv_packed.py``); the
    other paths, and flash with padding, take the q, k, v views."""
    if resolve(impl, qkv.device) == "flash" and key_padding is None:
        band = _band(window, causal)
        if documents is None:
            return flash_attention_qkvpacked(qkv, heads_k, causal=causal, dropout_p=dropout_p,
                                             window=band)
        cu_seqlens, max_seqlen = documents
        out = flash_attention_qkvpacked(qkv.flatten(0, 1), heads_k, causal=causal, dropout_p=dropout_p,
                                        cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, window=band)
        return out.view(*qkv.shape[:2], -1, qkv.shape[-1])
    q, k, v = qkv.split([qkv.shape[2] - 2 * heads_k, heads_k, heads_k], dim=2)
    return attention(q, k, v, impl=impl, causal=causal, dropout_p=dropout_p, key_padding=key_padding,
                     documents=documents, window=window)


def _band(window: int | None, causal: bool):
    """The kernels' (left, right) window of a model's ``window`` (keys before the query it sees)."""
    return None if window is None else (window, 0 if causal else window)


def attention(q, k, v, *, impl: str, causal: bool, dropout_p: float, key_padding=None, documents=None,
              window: int | None = None):
    """q (B, Nq, Hq, D), k/v (B, Nk, Hk, D) -> (B, Nq, Hq, D).

    ``key_padding`` (B, Nk) bool, True for real tokens (only with Nq == Nk: padded encoder input).
    ``documents`` = (cu_seqlens, max_seqlen): documents packed along the flattened B·N tokens; no
    token attends across a document boundary (flash only: the others would need an N x N mask).
    ``window``: sliding-window attention, each query sees at most ``window`` keys before it (with
    causal: itself and ``window`` before). flash skips the tiles outside it; sdpa and eager mask.
    Causal masks are aligned bottom-right, so a query block at the end of a KV cache is exact.
    """
    band = _band(window, causal)
    impl = resolve(impl, q.device)
    if documents is not None:
        if impl != "flash":
            raise ValueError(f"packed documents (cu_seqlens) need attention=flash, not {impl!r}")
        cu_seqlens, max_seqlen = documents
        flat = lambda t: t.reshape(-1, *t.shape[2:])
        out = flash_attention(flat(q), flat(k), flat(v), causal=causal, dropout_p=dropout_p,
                              cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, window=band)
        return out.view(q.shape)
    if impl == "flash":
        if key_padding is not None:
            return _flash_unpadded(q, k, v, causal, dropout_p, key_padding, band)
        return flash_attention(q, k, v, causal=causal, dropout_p=dropout_p, window=band)
    if impl == "sdpa":
        return _sdpa(q, k, v, causal, dropout_p, key_padding, band)
    if impl != "eager":
        raise ValueError(f"unknown attention implementation {impl!r}; use auto, flash, sdpa or eager")
    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    mask = _mask(q.shape[1], k.shape[1], causal, key_padding, q.device, band)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))          # (B, H, N, D)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(F.dropout(probs, dropout_p, training=dropout_p > 0), v)
    return out.transpose(1, 2)


def _sdpa(q, k, v, causal, dropout_p, key_padding, band=None):
    """PyTorch's fused attention. Plain causal self-attention goes through ``is_causal=True`` with
    no mask tensor: only then may PyTorch pick its flash or cuDNN backend (an explicit mask sends
    it to the memory-efficient or math kernel). A mask is built only where one is needed: padding,
    a sliding window, or a causal query block shorter than its keys (KV cache, bottom-right aligned)."""
    square_causal = causal and key_padding is None and band is None and q.shape[1] == k.shape[1]
    mask = None if square_causal else _mask(q.shape[1], k.shape[1], causal, key_padding, q.device, band)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))          # (B, H, N, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                         is_causal=square_causal, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


def _mask(seqlen_q, seqlen_k, causal, key_padding, device, band=None):
    """Boolean mask broadcastable to (B, H, Nq, Nk), True where attention is allowed, or None."""
    mask = visible_mask(seqlen_q, seqlen_k, causal, band, device)
    if mask is not None:
        mask = mask[None, None]
    if key_padding is not None:
        padding = key_padding[:, None, None, :]
        mask = padding if mask is None else mask & padding
    return mask


def _flash_unpadded(q, k, v, causal, dropout_p, key_padding, band=None):
    """Pack the real tokens of each sequence and run the variable-length kernel."""
    batch, seqlen = key_padding.shape
    lengths = key_padding.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    # Real tokens in order, row by row (any padding pattern packs the same way).
    index = key_padding.flatten().nonzero().squeeze(1)
    pack = lambda t: t.flatten(0, 1).index_select(0, index)
    out = flash_attention(pack(q), pack(k), pack(v), causal=causal, dropout_p=dropout_p,
                          cu_seqlens=cu_seqlens, max_seqlen=seqlen, window=band)
    full = out.new_zeros(batch * seqlen, *out.shape[1:])
    return full.index_copy(0, index, out).view(batch, seqlen, *out.shape[1:])
