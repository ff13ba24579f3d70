"""Forward pass: one program per (query block, head, sequence); K/V streamed with an online softmax.

Writes O and the row log-sum-exp (base 2, of the scaled scores) and nothing else; the backward
recomputes the score tiles from them.
"""

import math

import torch
import triton
import triton.language as tl

from ._launch import Geometry, batched_strides, dot_precision, forward_tiles
from ._philox import PHILOX_ROUNDS, dropout_keep_tile

LOG2E = math.log2(math.e)


@triton.jit
def sequence_bounds(cu_seqlens, batch_index, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first token, query length, key length) of one sequence."""
    if VARLEN:
        start = tl.load(cu_seqlens + batch_index)
        length = tl.load(cu_seqlens + batch_index + 1) - start
        return start, length, length
    # A tensor zero (not the literal 0) so callers can cast it like the loaded start.
    return tl.zeros((), dtype=tl.int32), seqlen_q, seqlen_k


@triton.jit
def _forward_kernel(
    Q, K, V, Out, Lse, cu_seqlens,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_lse_b, stride_lse_h,
    seqlen_q, seqlen_k, heads_q, group_size,
    qk_scale, seed, counter_base, drop_threshold, drop_rescale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr,
):
    # Reverse order: with causal masking the last query blocks do the most work; start them first.
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    head_k = head // group_size
    start, len_q, len_k = sequence_bounds(cu_seqlens, batch, seqlen_q, seqlen_k, VARLEN)
    m0 = block_m * BLOCK_M
    if m0 >= len_q:
        return

    batch64 = batch.to(tl.int64)
    row0 = start.to(tl.int64) + m0
    q_base = Q + batch64 * stride_qb + head.to(tl.int64) * stride_qh + row0 * stride_qn
    k_ptr = K + batch64 * stride_kb + head_k.to(tl.int64) * stride_kh + start.to(tl.int64) * stride_kn
    v_ptr = V + batch64 * stride_vb + head_k.to(tl.int64) * stride_vh + start.to(tl.int64) * stride_vn

    offs_m = tl.arange(0, BLOCK_M)          # query rows, relative to m0
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m                      # query index inside the sequence
    row_ok = rows < len_q
    d_ok = offs_d < HEAD_DIM

    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    kT_ptrs = k_ptr + offs_n[None, :] * stride_kn + offs_d[:, None]    # (BLOCK_D, BLOCK_N)
    v_ptrs = v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :]     # (BLOCK_N, BLOCK_D)

    # Causal, aligned bottom-right: query i sees keys j <= i + (len_k - len_q).
    diagonal = len_k - len_q
    if CAUSAL:
        hi = tl.maximum(tl.minimum(len_k, m0 + BLOCK_M + diagonal), 0)
    else:
        hi = len_k
    if DROPOUT:
        dropout_rows = ((batch64 * heads_q + head) * seqlen_q + rows).to(tl.int64)
        counters_per_row = (seqlen_k + 3) // 4

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)   # running row max (scaled, base 2)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)                 # running softmax denominator
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < len_k
        kT = tl.load(kT_ptrs + n0 * stride_kn, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        scores = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + diagonal)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row that has seen no visible key yet keeps m = -inf; shift it by 0 to avoid inf - inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            keep = dropout_keep_tile(seed, counter_base, dropout_rows, n0, counters_per_row,
                                     drop_threshold, BLOCK_M, BLOCK_N, N_ROUNDS)
            p = tl.where(keep, p * drop_rescale, 0.0)
        v = tl.load(v_ptrs + n0 * stride_vn, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # Rows that see no key at all (causal with len_q > len_k) output zeros; their lse is +inf so
    # the backward's exp2(score - lse) is 0 for them.
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_base = Out + batch64 * stride_ob + head.to(tl.int64) * stride_oh + row0 * stride_on
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    lse_ptr = Lse + batch64 * stride_lse_b + head.to(tl.int64) * stride_lse_h + start + rows
    tl.store(lse_ptr, lse, mask=row_ok)


def lse_shape(geometry: Geometry, total_tokens: int) -> tuple[int, ...]:
    """(batch, heads, seqlen) for padded input; (heads, total_tokens) for packed input."""
    if geometry.varlen:
        return (geometry.heads_q, total_tokens)
    return (geometry.batch, geometry.heads_q, geometry.seqlen_q)


def lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def forward(q, k, v, cu_seqlens, geometry: Geometry, softmax_scale: float, causal: bool,
            dropout_p: float, seed: int, offset: int, drop_threshold: int):
    """Launch the forward kernel; returns ``(out, lse)`` with ``out`` contiguous in q's shape."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape(geometry, q.shape[0]), dtype=torch.float32, device=q.device)
    tiles = forward_tiles(geometry.head_dim, q.device)
    grid = (triton.cdiv(geometry.seqlen_q, tiles.block_m), geometry.heads_q, geometry.batch)
    _forward_kernel[grid](
        q, k, v, out, lse, cu_seqlens,
        *batched_strides(q, geometry.varlen), *batched_strides(k, geometry.varlen),
        *batched_strides(v, geometry.varlen), *batched_strides(out, geometry.varlen),
        *lse_strides(lse, geometry.varlen),
        geometry.seqlen_q, geometry.seqlen_k, geometry.heads_q, geometry.group_size,
        softmax_scale * LOG2E, seed, offset // 4, drop_threshold,
        1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0,
        HEAD_DIM=geometry.head_dim, BLOCK_D=geometry.block_d,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        CAUSAL=causal, DROPOUT=dropout_p > 0, VARLEN=geometry.varlen,
        PRECISION=dot_precision(q.dtype), N_ROUNDS=PHILOX_ROUNDS,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out, lse
