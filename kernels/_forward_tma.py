"""Forward pass that reads Q, K and V through tensor descriptors (TMA), for Hopper and later.

The same arguments, outputs and numerics as ``_forward._forward_kernel``; launched instead of it
when the tiles ask for it (``Tiles.tma``) and the call qualifies (``_hopper.py``). The TMA copy
engine fills shared memory, bounded by the sequence: rows past its end and columns past head_dim
arrive as zeros, so the loads need no address arithmetic or masks. One key loop, masked on every
tile when the call has a band (causal, a window) or a ragged last key block, unmasked otherwise.

Measured on an H200 (docs/results/attention_notes.md, v7): +5-15 % forward TFLOP/s over the
portable kernel at head dim 128 without a mask, 1-6 % at head dim 64, behind it with a causal mask
(whose portable kernel masks only the diagonal tiles); the default tiles choose it only at head
dim 128 without a band (``_tile_rules.tma_forward_tiles``). Warp specialization of this loop
(``tl.range(..., warp_specialize=True)``: a TMA producer warp and two consumer warpgroups) compiled
on sm_90 with Triton 3.6 but gave wrong outputs with 128-row tiles and ran 40-50 % slower with
64-row tiles, so the loop is not specialized.
"""

import triton
import triton.language as tl

from ._philox import head_first_pair, pair_counter_base
from ._tiles import key_block_ranges, normalized_rows, online_softmax_block, store_rows


@triton.jit
def _key_loop(acc, l_i, m_i, q, k_desc, v_desc, lo, hi, rows, offs_n, len_k, upper, lower,
              qk_scale, seed, pair_counters, drop_threshold, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, UPPER: tl.constexpr,
              LOWER: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
              N_ROUNDS: tl.constexpr):
    for n0 in tl.range(lo, hi, BLOCK_N):
        k = k_desc.load([n0, 0])
        p, acc, l_i, m_new = online_softmax_block(
            acc, l_i, m_i, q, k, rows, n0, n0 + offs_n, len_k, upper, lower, qk_scale, seed,
            pair_counters, drop_threshold, BLOCK_M, BLOCK_N, MASKED, UPPER, LOWER, DROPOUT,
            PRECISION, N_ROUNDS)
        v = v_desc.load([n0, 0])
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# The signature of _forward._forward_kernel (launch plans pass the same arguments), plus MASKED.
@triton.jit(do_not_specialize=["seed", "counter_base"])
def _forward_tma_kernel(
    Q, K, V, Out, Lse, cu_seqlens, seed, counter_base,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_lse_b, stride_lse_h,
    seqlen_q, seqlen_k, heads_q, group_size, window_left, window_right,
    qk_scale, counters_per_row, drop_threshold, drop_rescale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPPER: tl.constexpr, LOWER: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr, MASKED: tl.constexpr,
):
    # Packed input would need a descriptor per sequence; it runs the portable kernel.
    tl.static_assert(not VARLEN, "packed input runs the portable kernel")
    # Reverse order: with causal masking the last query blocks do the most work; start them first.
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    head_k = head // group_size
    m0 = block_m * BLOCK_M           # < seqlen_q: the grid covers exactly the query blocks

    batch64 = batch.to(tl.int64)
    q_base = Q + batch64 * stride_qb + head.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qn
    k_base = K + batch64 * stride_kb + head_k.to(tl.int64) * stride_kh
    v_base = V + batch64 * stride_vb + head_k.to(tl.int64) * stride_vh
    q = tl.make_tensor_descriptor(q_base, shape=[seqlen_q - m0, HEAD_DIM], strides=[stride_qn, 1],
                                  block_shape=[BLOCK_M, BLOCK_D]).load([0, 0])
    k_desc = tl.make_tensor_descriptor(k_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_kn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(v_base, shape=[seqlen_k, HEAD_DIM], strides=[stride_vn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    row_ok = rows < seqlen_q
    upper = seqlen_k - seqlen_q + window_right
    lower = seqlen_k - seqlen_q - window_left
    pair_counters = pair_counter_base(
        counter_base, head_first_pair(batch64 * heads_q + head, seqlen_q) + m0 // 2, counters_per_row,
        BLOCK_M)
    keys_start, _, _, keys_end = key_block_ranges(m0, seqlen_k, upper, lower, BLOCK_M, BLOCK_N,
                                                  UPPER, LOWER)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc, l_i, m_i = _key_loop(acc, l_i, m_i, q, k_desc, v_desc, keys_start, keys_end, rows, offs_n,
                              seqlen_k, upper, lower, qk_scale, seed, pair_counters, drop_threshold,
                              BLOCK_M, BLOCK_N, MASKED, UPPER, LOWER, DROPOUT, PRECISION, N_ROUNDS)

    acc, lse = normalized_rows(acc, l_i, m_i, drop_rescale, DROPOUT)
    o_base = Out + batch64 * stride_ob + head.to(tl.int64) * stride_oh + m0.to(tl.int64) * stride_on
    store_rows(o_base + offs_m[:, None] * stride_on + offs_d[None, :], acc.to(Out.dtype.element_ty),
               row_ok, offs_d < HEAD_DIM, HEAD_DIM == BLOCK_D)
    tl.store(Lse + batch64 * stride_lse_b + head.to(tl.int64) * stride_lse_h + rows, lse,
             mask=row_ok)

