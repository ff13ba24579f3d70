"""``flash_attention_qkvpacked``: attention over a fused projection's output, read and differentiated
as one tensor.

A model that splits its qkv projection, (batch, seqlen, heads_q + 2·heads_k, head_dim), into q, k
and v views gets three gradients back from the attention, and autograd joins them into the
projection's gradient: under torch.compile a ``cat`` kernel that reads and writes 3·B·N·H·D values
per layer. Here the compiled backward writes dQ, dK and dV straight into their slices of one
gradient tensor. Eager calls split the views and take ``flash_attention``'s lighter path (its
launch plans outweigh the copy there).
"""

import math

import torch

from ._checks import check_inputs, check_window
from ._forward import lse_shape
from ._launch import call_geometry
from .flash_attention import (_backward_impl, _forward_impl, fake_rng_state, flash_attention,
                              seeds_on_device)


def split_qkv(qkv: torch.Tensor, heads_k: int):
    """The q, k and v views of ``qkv``: its first heads_q heads, then heads_k, then heads_k."""
    return qkv.split([qkv.shape[-2] - 2 * heads_k, heads_k, heads_k], dim=-2)


@torch.library.custom_op("flashtrain::flash_attention_qkv_forward", mutates_args=())
def _forward_op(qkv: torch.Tensor, heads_k: int, cu_seqlens: torch.Tensor | None, max_seqlen: int,
                softmax_scale: float, causal: bool, dropout_p: float, window_left: int = -1,
                window_right: int = -1, seed_on_device: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, lse, rng_state), as ``flashtrain::flash_attention_forward``."""
    return _forward_impl(*split_qkv(qkv, heads_k), cu_seqlens, max_seqlen, softmax_scale, causal,
                         dropout_p, window_left, window_right, seed_on_device)


@_forward_op.register_fake
def _(qkv, heads_k, cu_seqlens, max_seqlen, softmax_scale, causal, dropout_p, window_left=-1,
      window_right=-1, seed_on_device=False):
    q, k, _ = split_qkv(qkv, heads_k)
    geometry = call_geometry(q, k, cu_seqlens, max_seqlen)
    lse = qkv.new_empty(lse_shape(geometry, q.shape[0]), dtype=torch.float32)
    return q.new_empty(q.shape), lse, fake_rng_state(q.device, dropout_p, seed_on_device)


@torch.library.custom_op("flashtrain::flash_attention_qkv_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, qkv: torch.Tensor, heads_k: int, out: torch.Tensor,
                 lse: torch.Tensor, rng_state: torch.Tensor, cu_seqlens: torch.Tensor | None,
                 max_seqlen: int, softmax_scale: float, causal: bool, dropout_p: float,
                 window_left: int = -1, window_right: int = -1) -> torch.Tensor:
    """The gradient of ``qkv``, its q, k and v slices written in place by the two passes."""
    grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _backward_impl(grad_out, *split_qkv(qkv, heads_k), out, lse, rng_state, cu_seqlens, max_seqlen,
                   softmax_scale, causal, dropout_p, window_left, window_right,
                   grads=split_qkv(grad_qkv, heads_k))
    return grad_qkv


@_backward_op.register_fake
def _(grad_out, qkv, heads_k, out, lse, rng_state, cu_seqlens, max_seqlen, softmax_scale, causal,
      dropout_p, window_left=-1, window_right=-1):
    return qkv.new_empty(qkv.shape)


def _save_for_backward(ctx, inputs, output):
    qkv, heads_k, cu_seqlens, max_seqlen, softmax_scale, causal, dropout_p, window_left, window_right, _ = inputs
    out, lse, rng_state = output
    ctx.save_for_backward(qkv, out, lse, rng_state, cu_seqlens)
    ctx.options = (heads_k, max_seqlen, softmax_scale, causal, dropout_p, window_left, window_right)
    ctx.mark_non_differentiable(lse, rng_state)


def _op_backward(ctx, grad_out, _grad_lse, _grad_rng_state):
    qkv, out, lse, rng_state, cu_seqlens = ctx.saved_tensors
    heads_k, max_seqlen, *rest = ctx.options
    grad_qkv = _backward_op(grad_out, qkv, heads_k, out, lse, rng_state, cu_seqlens, max_seqlen, *rest)
    return grad_qkv, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("flashtrain::flash_attention_qkv_forward", _op_backward,
                                setup_context=_save_for_backward)


def flash_attention_qkvpacked(qkv, heads_k=None, *, causal=False, dropout_p=0.0, softmax_scale=None,
                              cu_seqlens=None, max_seqlen=None, window=None):
    """``flash_attention`` of the q, k and v heads of one tensor.

    Args:
        qkv: (batch, seqlen, heads_q + 2·heads_k, head_dim), or (total_tokens, heads_q + 2·heads_k,
            head_dim) with cu_seqlens: the query heads, then the key heads, then the value heads
            (a fused projection's output viewed per head).
        heads_k: key/value heads (GQA); default a third of the heads (heads_q = heads_k).
        The other arguments are ``flash_attention``'s.

    Returns:
        out, (batch, seqlen, heads_q, head_dim) (or (total_tokens, heads_q, head_dim)), contiguous.
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() not in (3, 4):
        raise ValueError("flash_attention_qkvpacked: qkv must be a 4-D (batch, seqlen, heads, head_dim) "
                         "or, with cu_seqlens, 3-D (total_tokens, heads, head_dim) tensor; got "
                         f"{type(qkv).__name__ if not isinstance(qkv, torch.Tensor) else tuple(qkv.shape)}")
    heads = qkv.shape[-2]
    if heads_k is None:
        if heads % 3:
            raise ValueError(f"flash_attention_qkvpacked: {heads} heads are not three equal groups; "
                             "pass heads_k for grouped-query attention")
        heads_k = heads // 3
    if heads_k < 1 or heads - 2 * heads_k < 1:
        raise ValueError(f"flash_attention_qkvpacked: heads_k={heads_k} must be >= 1 and leave "
                         f"query heads among the {heads}")
    q, k, v = split_qkv(qkv, heads_k)
    options = dict(causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale,
                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, window=window)
    if not torch.compiler.is_compiling():
        return flash_attention(q, k, v, **options)
    check_inputs(q, k, v, dropout_p, softmax_scale, cu_seqlens, max_seqlen)
    window_left, window_right = check_window(window, causal)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    scale = 1.0 / math.sqrt(qkv.shape[-1]) if softmax_scale is None else float(softmax_scale)
    out, _lse, _rng_state = _forward_op(qkv, heads_k, cu_seqlens,
                                        max_seqlen if cu_seqlens is not None else 0, scale,
                                        bool(causal), float(dropout_p), window_left, window_right,
                                        seeds_on_device())
    return out
