"""Plain PyTorch attention with explicit masks: the yardstick the kernels are tested against.

Materializes the (Nq, Nk) score matrix, so it is for tests and small comparisons only. It follows
the kernel's conventions exactly: bottom-right causal and window alignment, rows that see no key
output 0, dropout applied to the normalized probabilities with a given keep-mask and 1/(1-p)
rescaling.
"""

import math

import torch


def causal_mask(seqlen_q: int, seqlen_k: int, device=None) -> torch.Tensor:
    """(Nq, Nk) boolean, True where query i may see key j: j <= i + (Nk - Nq)."""
    return visible_mask(seqlen_q, seqlen_k, True, device=device)


def visible_mask(seqlen_q: int, seqlen_k: int, causal: bool, window=None, device=None):
    """(Nq, Nk) boolean of the keys each query sees (causal and/or ``window=(left, right)``, each
    side an int or None, on the bottom-right aligned diagonal), or None when it sees them all."""
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0
    if left is None and right is None:
        return None
    offset = (torch.arange(seqlen_k, device=device)[None, :] - torch.arange(seqlen_q, device=device)[:, None]
              - (seqlen_k - seqlen_q))             # j - i on the aligned diagonal
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right is not None:
        visible &= offset <= right
    if left is not None:
        visible &= offset >= -left
    return visible


def _attend(q, k, v, causal, softmax_scale, keep, dropout_p, window=None):
    """One padded batch: q (B, Nq, Hq, D), k/v (B, Nk, Hk, D); keep (B, Hq, Nq, Nk) or None."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * softmax_scale
    visible = visible_mask(q.shape[1], k.shape[1], causal, window, q.device)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # A row with no visible key is all -inf; softmax gives NaN, the kernel gives 0.
        probs = probs.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
    else:
        probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        probs = probs * keep.to(probs.dtype) / (1.0 - dropout_p)
    return torch.einsum("bhij,bjhd->bihd", probs, v)


def attention_reference(q, k, v, *, causal=False, softmax_scale=None, dropout_mask=None,
                        dropout_p=0.0, cu_seqlens=None, window=None, compute_dtype=None):
    """Exact attention in ``compute_dtype`` (default: the inputs' own dtype).

    Same layouts as ``flash_attention``: (batch, seqlen, heads, head_dim), or packed
    (total_tokens, heads, head_dim) with ``cu_seqlens``. ``dropout_mask`` is the boolean keep-mask,
    (batch, heads_q, Nq, Nk), e.g. from ``flash_attention(..., return_debug_mask=True)``; for packed
    input it is indexed with the sequence's own length in the top-left corner. ``window`` as in
    ``flash_attention``. Differentiable.
    """
    dtype = compute_dtype or q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        return _attend(q, k, v, causal, softmax_scale, dropout_mask, dropout_p, window)
    outputs = []
    bounds = cu_seqlens.tolist()
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        length = end - start
        keep = None
        if dropout_mask is not None:
            keep = dropout_mask[index:index + 1, :, :length, :length]
        outputs.append(_attend(q[None, start:end], k[None, start:end], v[None, start:end],
                               causal, softmax_scale, keep, dropout_p, window)[0])
    return torch.cat(outputs, dim=0)
