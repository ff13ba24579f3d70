"""dQ pass for Hopper and later (sm_90+): TMA loads and a warp-specialized key loop.

The same arguments, outputs and numerics as ``_backward._dq_kernel`` (which also writes
``delta = rowsum(dO * O)`` for the dK/dV pass); launched instead of it when the dQ tiles ask for
it (``Tiles.warp_specialize``) and the call qualifies (``_hopper.py``; dropout only with a 64-row
query tile, as in the Hopper forward). A program holds ``BLOCK_M`` queries and streams ``BLOCK_N``
keys through one loop, masked on every tile when the call has a band or a ragged last key block.
"""

import triton
import triton.language as tl

from ._philox import dropout_keep_tile, head_first_pair, pair_counter_base
from ._tiles import key_block_ranges, visible_tile


@triton.jit(do_not_specialize=["seed", "counter_base"])
def _dq_hopper_kernel(
    Q, K, V, GradOut, Out, Lse, Delta, GradQ, cu_seqlens, seed, counter_base,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_gb, stride_gn, stride_gh,
    stride_ob, stride_on, stride_oh,
    stride_dqb, stride_dqn, stride_dqh, stride_lse_b, stride_lse_h,
    seqlen_q, seqlen_k, heads_q, group_size, window_left, window_right,
    softmax_scale, qk_scale, counters_per_row, drop_threshold, drop_rescale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPPER: tl.constexpr, LOWER: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr, MASKED: tl.constexpr,
):
    tl.static_assert(not VARLEN, "packed input runs the portable kernel")
    tl.static_assert(not DROPOUT or BLOCK_M <= 64, "dropout needs a query tile of at most 64 rows")
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    batch64 = tl.program_id(2).to(tl.int64)
    head64 = head.to(tl.int64)
    head_k64 = (head // group_size).to(tl.int64)
    m0 = block_m * BLOCK_M                 # < seqlen_q: the grid covers exactly the query blocks
    rows_left = seqlen_q - m0
    m64 = m0.to(tl.int64)

    q_desc = tl.make_tensor_descriptor(Q + batch64 * stride_qb + head64 * stride_qh + m64 * stride_qn,
                                      shape=[rows_left, HEAD_DIM], strides=[stride_qn, 1],
                                      block_shape=[BLOCK_M, BLOCK_D])
    do_desc = tl.make_tensor_descriptor(GradOut + batch64 * stride_gb + head64 * stride_gh + m64 * stride_gn,
                                       shape=[rows_left, HEAD_DIM], strides=[stride_gn, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    o_desc = tl.make_tensor_descriptor(Out + batch64 * stride_ob + head64 * stride_oh + m64 * stride_on,
                                      shape=[rows_left, HEAD_DIM], strides=[stride_on, 1],
                                      block_shape=[BLOCK_M, BLOCK_D])
    k_desc = tl.make_tensor_descriptor(K + batch64 * stride_kb + head_k64 * stride_kh,
                                       shape=[seqlen_k, HEAD_DIM], strides=[stride_kn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + batch64 * stride_vb + head_k64 * stride_vh,
                                       shape=[seqlen_k, HEAD_DIM], strides=[stride_vn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    q = q_desc.load([0, 0])
    do = do_desc.load([0, 0])
    o = o_desc.load([0, 0])

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    row_ok = rows < seqlen_q
    row_stats = batch64 * stride_lse_b + head64 * stride_lse_h + rows
    lse = tl.load(Lse + row_stats, mask=row_ok, other=float("inf"))
    # delta = rowsum(dO * O), which the dK/dV pass (launched after this one) reads back.
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if DROPOUT:
        delta = delta / drop_rescale       # stored and used as delta * (1 - p) (_backward.py)
    tl.store(Delta + row_stats, delta, mask=row_ok)

    upper = seqlen_k - seqlen_q + window_right
    lower = seqlen_k - seqlen_q - window_left
    pair_counters = pair_counter_base(
        counter_base, head_first_pair(batch64 * heads_q + head, seqlen_q) + m0 // 2, counters_per_row,
        BLOCK_M)
    keys_start, _, _, keys_end = key_block_ranges(m0, seqlen_k, upper, lower, BLOCK_M, BLOCK_N,
                                                  UPPER, LOWER)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in tl.range(keys_start, keys_end, BLOCK_N, warp_specialize=True):
        k = k_desc.load([n0, 0])
        v = v_desc.load([n0, 0])
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.math.exp2(scores * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(visible_tile(rows, n0 + offs_n, seqlen_k, upper, lower, UPPER, LOWER), p,
                         0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = dropout_keep_tile(seed, pair_counters, n0, drop_threshold, BLOCK_M, BLOCK_N,
                                     N_ROUNDS)
            dp = tl.where(keep, dp, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)

    if DROPOUT:
        dq *= softmax_scale * drop_rescale
    else:
        dq *= softmax_scale
    ok = row_ok[:, None]
    if HEAD_DIM != BLOCK_D:
        ok = ok & (offs_d < HEAD_DIM)[None, :]
    tl.store(GradQ + batch64 * stride_dqb + head64 * stride_dqh + rows.to(tl.int64)[:, None] * stride_dqn
             + offs_d[None, :], dq.to(GradQ.dtype.element_ty), mask=ok)
