"""Argument checks for flash_attention: each failure names the argument and what was expected."""

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_inputs(q, k, v, dropout_p, softmax_scale, cu_seqlens, max_seqlen):
    """Validate and return ``(batch, heads_q, heads_k, seqlen_q, seqlen_k, head_dim)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"flash_attention: {name} has dtype {t.dtype}; expected one of "
                            "torch.float16, torch.bfloat16, torch.float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attention: q, k, v must share one dtype; got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must be on one device; got {q.device}, "
                         f"{k.device}, {v.device}")
    varlen = cu_seqlens is not None
    rank = 3 if varlen else 4
    layout = "(total_tokens, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"flash_attention: {name} must be {rank}-D {layout}"
                             f"{' when cu_seqlens is given' if varlen else ''}; got {_describe(t)}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape; got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    head_dim, heads_q, heads_k = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"flash_attention: head_dim of k/v ({k.shape[-1]}) must equal q's ({head_dim})")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head_dim must be in 1..{MAX_HEAD_DIM}; got {head_dim}")
    if heads_k == 0 or heads_q % heads_k != 0:
        raise ValueError(f"flash_attention: the number of query heads ({heads_q}) must be a multiple "
                         f"of the number of key/value heads ({heads_k}) (MQA/GQA)")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attention: dropout_p must be a float in [0, 1); got {dropout_p!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float))
                                          and softmax_scale > 0 and softmax_scale != float("inf")):
        raise ValueError(f"flash_attention: softmax_scale must be a positive finite float or None; "
                         f"got {softmax_scale!r}")
    if varlen:
        return _check_varlen(q, k, cu_seqlens, max_seqlen, heads_q, heads_k, head_dim)
    if max_seqlen is not None:
        raise ValueError("flash_attention: max_seqlen is only meaningful together with cu_seqlens")
    batch, seqlen_q = q.shape[0], q.shape[1]
    if k.shape[0] != batch:
        raise ValueError(f"flash_attention: q and k/v must have the same batch size; got {batch} "
                         f"and {k.shape[0]}")
    if seqlen_q == 0 or k.shape[1] == 0 or batch == 0:
        raise ValueError(f"flash_attention: batch and sequence lengths must be >= 1; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}")
    return batch, heads_q, heads_k, seqlen_q, k.shape[1], head_dim


def _check_varlen(q, k, cu_seqlens, max_seqlen, heads_q, heads_k, head_dim):
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 \
            or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        got = _describe(cu_seqlens) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens)
        raise TypeError(f"flash_attention: cu_seqlens must be a 1-D torch.int32 tensor of batch+1 "
                        f"cumulative offsets; got {got}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"flash_attention: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"flash_attention: max_seqlen (the longest sequence, an int >= 1) is required "
                         f"with cu_seqlens; got {max_seqlen!r}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"flash_attention: with cu_seqlens, q and k/v must hold the same tokens; got "
                         f"{q.shape[0]} and {k.shape[0]}")
    # Checking the offsets' values needs them on the host: free on CPU, a device sync on CUDA, so it
    # is done only there (and never while torch.compile traces).
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        bounds = cu_seqlens.tolist()
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        if bounds[0] != 0 or bounds[-1] != q.shape[0] or min(lengths) < 0:
            raise ValueError(f"flash_attention: cu_seqlens must rise from 0 to total_tokens "
                             f"({q.shape[0]}); got {bounds}")
        if max(lengths) > max_seqlen:
            raise ValueError(f"flash_attention: max_seqlen={max_seqlen} is shorter than the longest "
                             f"sequence in cu_seqlens ({max(lengths)})")
    return cu_seqlens.numel() - 1, heads_q, heads_k, max_seqlen, max_seqlen, head_dim


def check_window(window, causal: bool) -> tuple[int, int]:
    """``window=(left, right)`` as the kernels' (left, right) with -1 for an unbounded side."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"flash_attention: window must be a pair (left, right) of ints >= 0 or None; "
                         f"got {window!r}")
    sides = []
    for name, side in zip(("left", "right"), window):
        if side is None:
            sides.append(-1)
        elif isinstance(side, int) and not isinstance(side, bool) and side >= 0:
            sides.append(side)
        else:
            raise ValueError(f"flash_attention: window {name} must be an int >= 0 or None "
                             f"(unbounded); got {side!r}")
    if causal and sides[1] > 0:
        raise ValueError(f"flash_attention: a causal query sees no key after it, so window right must "
                         f"be 0 or None with causal=True; got window={tuple(window)}")
    return sides[0], -1 if causal else sides[1]
