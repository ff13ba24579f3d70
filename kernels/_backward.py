"""Backward pass (FlashAttention-2): recompute score tiles from Q, K and the saved log-sum-exp.

Three launches, no atomics (so the result is deterministic):
  1. ``delta = rowsum(dO * O)`` per query row;
  2. one program per (key block, kv-head, sequence) accumulates dK and dV over every query block of
     every query head that shares this kv-head (GQA), holding K and V in registers;
  3. one program per (query block, head, sequence) accumulates dQ over the key blocks.
The dropout mask of each tile is regenerated from the forward's seed and offset.
"""

import torch
import triton
import triton.language as tl

from ._forward import LOG2E, lse_strides, sequence_bounds
from ._launch import Geometry, backward_tiles, batched_strides, dot_precision
from ._philox import PHILOX_ROUNDS, dropout_keep_tile


@triton.jit
def _delta_kernel(Out, GradOut, Delta, cu_seqlens,
                  stride_ob, stride_on, stride_oh, stride_gb, stride_gn, stride_gh,
                  stride_delta_b, stride_delta_h, seqlen_q,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  VARLEN: tl.constexpr):
    block_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    start, len_q, _ = sequence_bounds(cu_seqlens, batch, seqlen_q, seqlen_q, VARLEN)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < len_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    token = (start + rows).to(tl.int64)[:, None]
    o = tl.load(Out + batch * stride_ob + head * stride_oh + token * stride_on + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(GradOut + batch * stride_gb + head * stride_gh + token * stride_gn + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + batch * stride_delta_b + head * stride_delta_h + start + rows,
             tl.sum(o * do, 1), mask=rows < len_q)


@triton.jit
def _dkdv_kernel(
    Q, K, V, GradOut, Lse, Delta, GradK, GradV, cu_seqlens,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_gb, stride_gn, stride_gh,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_lse_b, stride_lse_h,
    seqlen_q, seqlen_k, heads_q, group_size,
    softmax_scale, qk_scale, seed, counter_base, drop_threshold, drop_rescale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    block_n = tl.program_id(0)
    head_k = tl.program_id(1)
    batch = tl.program_id(2)
    start, len_q, len_k = sequence_bounds(cu_seqlens, batch, seqlen_q, seqlen_k, VARLEN)
    n0 = block_n * BLOCK_N
    if n0 >= len_k:
        return
    batch64 = batch.to(tl.int64)
    start64 = start.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)       # key index inside the sequence
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < len_k
    d_ok = offs_d < HEAD_DIM
    kv_mask = col_ok[:, None] & d_ok[None, :]
    key_tokens = (start64 + cols)[:, None]
    k = tl.load(K + batch64 * stride_kb + head_k.to(tl.int64) * stride_kh + key_tokens * stride_kn
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + batch64 * stride_vb + head_k.to(tl.int64) * stride_vh + key_tokens * stride_vn
                + offs_d[None, :], mask=kv_mask, other=0.0)

    diagonal = len_k - len_q
    if CAUSAL:
        # The first query that sees key n0 is n0 - diagonal; start at the block holding it.
        lo = tl.maximum(n0 - diagonal, 0) // BLOCK_M * BLOCK_M
    else:
        lo = 0
    if DROPOUT:
        counters_per_row = (seqlen_k + 3) // 4

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for g in range(0, group_size):
        head = head_k * group_size + g
        q_ptr = Q + batch64 * stride_qb + head.to(tl.int64) * stride_qh + start64 * stride_qn
        do_ptr = GradOut + batch64 * stride_gb + head.to(tl.int64) * stride_gh + start64 * stride_gn
        row_stats = batch64 * stride_lse_b + head.to(tl.int64) * stride_lse_h + start
        for m0 in range(lo, len_q, BLOCK_M):
            rows = m0 + offs_m
            row_ok = rows < len_q
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qn + offs_d[None, :],
                        mask=q_mask, other=0.0)
            do = tl.load(do_ptr + rows.to(tl.int64)[:, None] * stride_gn + offs_d[None, :],
                         mask=q_mask, other=0.0)
            # Padding rows get lse = +inf, so their probabilities are exactly 0.
            lse = tl.load(Lse + row_stats + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(Delta + row_stats + rows, mask=row_ok, other=0.0)
            # Scores transposed, (BLOCK_N, BLOCK_M), so dK and dV accumulate without a transpose.
            scoresT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            pT = tl.math.exp2(scoresT - lse[None, :])
            visible = col_ok[:, None] & row_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[:, None] <= rows[None, :] + diagonal)
            pT = tl.where(visible, pT, 0.0)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            if DROPOUT:
                dropout_rows = ((batch64 * heads_q + head) * seqlen_q + rows).to(tl.int64)
                keepT = tl.trans(dropout_keep_tile(seed, counter_base, dropout_rows, n0,
                                                   counters_per_row, drop_threshold,
                                                   BLOCK_M, BLOCK_N, N_ROUNDS))
                pT_dropped = tl.where(keepT, pT * drop_rescale, 0.0)
                dpT = tl.where(keepT, dpT * drop_rescale, 0.0)
            else:
                pT_dropped = pT
            dv += tl.dot(pT_dropped.to(do.dtype), do, input_precision=PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)

    dk *= softmax_scale
    out_mask = col_ok[:, None] & d_ok[None, :]
    tl.store(GradK + batch64 * stride_dkb + head_k.to(tl.int64) * stride_dkh
             + key_tokens * stride_dkn + offs_d[None, :], dk.to(GradK.dtype.element_ty), mask=out_mask)
    tl.store(GradV + batch64 * stride_dvb + head_k.to(tl.int64) * stride_dvh
             + key_tokens * stride_dvn + offs_d[None, :], dv.to(GradV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_kernel(
    Q, K, V, GradOut, Lse, Delta, GradQ, cu_seqlens,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_gb, stride_gn, stride_gh,
    stride_dqb, stride_dqn, stride_dqh, stride_lse_b, stride_lse_h,
    seqlen_q, seqlen_k, heads_q, group_size,
    softmax_scale, qk_scale, seed, counter_base, drop_threshold, drop_rescale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    head_k = head // group_size
    start, len_q, len_k = sequence_bounds(cu_seqlens, batch, seqlen_q, seqlen_k, VARLEN)
    m0 = block_m * BLOCK_M
    if m0 >= len_q:
        return
    batch64 = batch.to(tl.int64)
    start64 = start.to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < len_q
    d_ok = offs_d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    query_tokens = (start64 + rows)[:, None]
    q = tl.load(Q + batch64 * stride_qb + head.to(tl.int64) * stride_qh + query_tokens * stride_qn
                + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(GradOut + batch64 * stride_gb + head.to(tl.int64) * stride_gh
                 + query_tokens * stride_gn + offs_d[None, :], mask=q_mask, other=0.0)
    row_stats = batch64 * stride_lse_b + head.to(tl.int64) * stride_lse_h + start + rows
    lse = tl.load(Lse + row_stats, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + row_stats, mask=row_ok, other=0.0)
    k_ptr = K + batch64 * stride_kb + head_k.to(tl.int64) * stride_kh + start64 * stride_kn
    v_ptr = V + batch64 * stride_vb + head_k.to(tl.int64) * stride_vh + start64 * stride_vn

    diagonal = len_k - len_q
    if CAUSAL:
        hi = tl.maximum(tl.minimum(len_k, m0 + BLOCK_M + diagonal), 0)
    else:
        hi = len_k
    if DROPOUT:
        dropout_rows = ((batch64 * heads_q + head) * seqlen_q + rows).to(tl.int64)
        counters_per_row = (seqlen_k + 3) // 4

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < len_k
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + cols.to(tl.int64)[:, None] * stride_kn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + cols.to(tl.int64)[:, None] * stride_vn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(scores - lse[:, None])
        visible = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + diagonal)
        p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = dropout_keep_tile(seed, counter_base, dropout_rows, n0, counters_per_row,
                                     drop_threshold, BLOCK_M, BLOCK_N, N_ROUNDS)
            dp = tl.where(keep, dp * drop_rescale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq *= softmax_scale
    tl.store(GradQ + batch64 * stride_dqb + head.to(tl.int64) * stride_dqh
             + query_tokens * stride_dqn + offs_d[None, :], dq.to(GradQ.dtype.element_ty), mask=q_mask)


def backward(grad_out, q, k, v, out, lse, cu_seqlens, geometry: Geometry, softmax_scale: float,
             causal: bool, dropout_p: float, seed: int, offset: int, drop_threshold: int):
    """Gradients ``(dq, dk, dv)``, contiguous, in the shapes of q, k and v."""
    varlen = geometry.varlen
    tiles = backward_tiles(geometry.head_dim, q.device)
    common = dict(HEAD_DIM=geometry.head_dim, BLOCK_D=geometry.block_d, VARLEN=varlen)

    delta = torch.empty_like(lse)
    delta_block = 64 if q.device.type == "cuda" else 16
    _delta_kernel[(triton.cdiv(geometry.seqlen_q, delta_block), geometry.heads_q, geometry.batch)](
        out, grad_out, delta, cu_seqlens,
        *batched_strides(out, varlen), *batched_strides(grad_out, varlen), *lse_strides(lse, varlen),
        geometry.seqlen_q, BLOCK_M=delta_block, **common)

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    inputs = (*batched_strides(q, varlen), *batched_strides(k, varlen), *batched_strides(v, varlen),
              *batched_strides(grad_out, varlen))
    scalars = (geometry.seqlen_q, geometry.seqlen_k, geometry.heads_q, geometry.group_size,
               softmax_scale, softmax_scale * LOG2E, seed, offset // 4, drop_threshold,
               1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0)
    flags = dict(CAUSAL=causal, DROPOUT=dropout_p > 0, PRECISION=dot_precision(q.dtype),
                 N_ROUNDS=PHILOX_ROUNDS, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                 **common)

    _dkdv_kernel[(triton.cdiv(geometry.seqlen_k, tiles.block_n), geometry.heads_k, geometry.batch)](
        q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens, *inputs,
        *batched_strides(dk, varlen), *batched_strides(dv, varlen), *lse_strides(lse, varlen),
        *scalars, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, **flags)
    # dQ streams keys instead of queries: the roles of the two tile sides swap.
    _dq_kernel[(triton.cdiv(geometry.seqlen_q, tiles.block_n), geometry.heads_q, geometry.batch)](
        q, k, v, grad_out, lse, delta, dq, cu_seqlens, *inputs,
        *batched_strides(dq, varlen), *lse_strides(lse, varlen),
        *scalars, BLOCK_M=tiles.block_n, BLOCK_N=tiles.block_m, **flags)
    return dq, dk, dv
