"""dK/dV pass for Hopper and later (sm_90+): TMA loads and a warp-specialized query loop.

The same arguments, outputs and numerics as ``_backward._dkdv_kernel`` without dropout; launched
instead of it when the dK/dV tiles ask for it (``Tiles.warp_specialize``) and the call qualifies
(``_hopper.py``; also one query head per kv-head and no dropout, whose masks this pass would
have to build transposed). A program holds ``BLOCK_N`` keys and streams
``BLOCK_M``-row query blocks through one loop; Triton gives the Q and dO copies to a producer warp
and splits the key tile between two consumer warpgroups. As in the Hopper forward, the one loop is
masked on every tile when the call has a band or a ragged last query block, unmasked otherwise.
Rows past the sequence end arrive as zeros; their lse reads as +inf, so they contribute nothing.
"""

import triton
import triton.language as tl

from ._tiles import transposed_probabilities


@triton.jit(do_not_specialize=["seed", "counter_base"])
def _dkdv_hopper_kernel(
    Q, K, V, GradOut, Lse, Delta, GradK, GradV, cu_seqlens, seed, counter_base,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_gb, stride_gn, stride_gh,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_lse_b, stride_lse_h,
    seqlen_q, seqlen_k, heads_q, group_size, window_left, window_right,
    softmax_scale, qk_scale, counters_per_row, drop_threshold, drop_rescale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPPER: tl.constexpr, LOWER: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr, MASK_LAYOUT: tl.constexpr,
    MASKED: tl.constexpr,
):
    tl.static_assert(not DROPOUT and not VARLEN, "dropout and packed input run the portable kernel")
    n0 = tl.program_id(0) * BLOCK_N         # < seqlen_k: the grid covers exactly the key blocks
    head = tl.program_id(1)                 # one query head per kv-head (group_size 1)
    batch64 = tl.program_id(2).to(tl.int64)
    head64 = head.to(tl.int64)
    k = tl.make_tensor_descriptor(K + batch64 * stride_kb + head64 * stride_kh, shape=[seqlen_k, HEAD_DIM],
                                  strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D]).load([n0, 0])
    v = tl.make_tensor_descriptor(V + batch64 * stride_vb + head64 * stride_vh, shape=[seqlen_k, HEAD_DIM],
                                  strides=[stride_vn, 1], block_shape=[BLOCK_N, BLOCK_D]).load([n0, 0])
    q_desc = tl.make_tensor_descriptor(Q + batch64 * stride_qb + head64 * stride_qh,
                                       shape=[seqlen_q, HEAD_DIM], strides=[stride_qn, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    do_desc = tl.make_tensor_descriptor(GradOut + batch64 * stride_gb + head64 * stride_gh,
                                        shape=[seqlen_q, HEAD_DIM], strides=[stride_gn, 1],
                                        block_shape=[BLOCK_M, BLOCK_D])
    row_stats = batch64 * stride_lse_b + head64 * stride_lse_h
    lse_ptr = Lse + row_stats
    delta_ptr = Delta + row_stats

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = n0 + offs_n
    # The query blocks that see any key of this block (the band i + lower <= j <= i + upper).
    upper = seqlen_k - seqlen_q + window_right
    lower = seqlen_k - seqlen_q - window_left
    if UPPER:
        lo = tl.maximum(n0 - upper, 0) // BLOCK_M * BLOCK_M
    else:
        lo = 0
    if LOWER:
        hi = tl.minimum(tl.maximum(n0 + BLOCK_N - lower, 0), seqlen_q)
    else:
        hi = seqlen_q

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in tl.range(lo, hi, BLOCK_M, warp_specialize=True):
        rows = m0 + offs_m
        q = q_desc.load([m0, 0])
        do = do_desc.load([m0, 0])
        if MASKED:
            row_ok = rows < seqlen_q
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        pT = transposed_probabilities(k, q, lse, rows, cols, seqlen_k, upper, lower, qk_scale,
                                      MASKED, UPPER, LOWER, PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)

    dk *= softmax_scale
    keys_ok = (cols < seqlen_k)[:, None]
    if HEAD_DIM != BLOCK_D:
        keys_ok = keys_ok & (offs_d < HEAD_DIM)[None, :]
    key_tokens = cols.to(tl.int64)[:, None]
    tl.store(GradK + batch64 * stride_dkb + head64 * stride_dkh + key_tokens * stride_dkn
             + offs_d[None, :], dk.to(GradK.dtype.element_ty), mask=keys_ok)
    tl.store(GradV + batch64 * stride_dvb + head64 * stride_dvh + key_tokens * stride_dvn
             + offs_d[None, :], dv.to(GradV.dtype.element_ty), mask=keys_ok)

