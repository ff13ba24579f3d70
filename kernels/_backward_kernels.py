"""The backward pass's Triton kernels (FlashAttention-2): recompute score tiles from Q, K and the
saved log-sum-exp. Their launch (tiles, arguments, the Gluon passes on sm_90): ``_backward.py``.

Two launches, no atomics (so the result is deterministic):
  1. one program per (query block, head, sequence) computes ``delta = rowsum(dO * O)`` for its rows
     (stored for pass 2) and accumulates dQ over the key blocks;
  2. one program per (key block, kv-head, sequence) accumulates dK and dV over every query block of
     every query head that shares this kv-head (GQA), holding K and V on chip.
Or, with dK/dV tiles marked ``fused``, FlashAttention-2's single pass: pass 1 computes delta only,
and pass 2 also adds each tile's dQ share, dS·K, to a float32 buffer by atomic adds. That is five
products per tile instead of seven, and one dropout-mask regeneration instead of two, for atomic
traffic and a dQ that is not bitwise deterministic. It is the default where it was measured faster
(``_tile_rules.dkdv_tiles``: head dim 64 with dropout), except under
``torch.use_deterministic_algorithms(True)``.
As in the forward, tiles that need no mask (fully visible, fully in range) run a mask-free loop.
Tiles marked ``gluon`` run a pass as the Gluon kernel for sm_90 (``_dq_gluon.py``,
``_dkdv_gluon.py``) where the call qualifies (``_hopper.gluon_device`` and ``gluon_dq_call`` or
``gluon_dkdv_call``), else the pass here.
The dropout mask of each tile is regenerated from the forward's seed and offset.

Dropout's rescale r = 1 / (1 - p) is kept out of the inner loops (two multiplies per score
element, ~9 % of the dK/dV loop's instructions): with D the dropped-and-kept mask,
dV = r·(D∘P)ᵀdO and dS = P∘(r·D∘dP − δ) = r·P∘(D∘dP − δ/r), so the loops use unscaled masked
tiles and δ/r (which the dQ pass stores in place of δ), and r is applied once to dQ, dK and dV.
"""

import triton
import triton.language as tl

from ._philox import dropout_keep_tile, head_first_pair, pair_counter_base
from ._tiles import (key_block_ranges, load_rows, sequence_bounds, store_rows,
                     transposed_probabilities, visible_tile)


@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, stride_qn, stride_gn, stride_aqn,
                       lse_ptr, delta_ptr,
                       lo, hi, n0, cols, offs_m, d_ok, len_q, len_k, upper, lower, qk_scale,
                       seed, counter_base, dropout_first_pair, counters_per_row, drop_threshold,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       EVEN_D: tl.constexpr, MASKED: tl.constexpr, UPPER: tl.constexpr,
                       LOWER: tl.constexpr,
                       DROPOUT: tl.constexpr, PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr,
                       MASK_LAYOUT: tl.constexpr, ACCUMULATE_DQ: tl.constexpr,
                       SEED_IN_MEMORY: tl.constexpr):
    for m0 in range(lo, hi, BLOCK_M):
        if DROPOUT and SEED_IN_MEMORY:
            # Loaded where it is used rather than held across the loop: this pass sits at the
            # register cap, where a live 64-bit seed cost +7.8 % (attention_notes.md, v13).
            philox_seed = tl.load(seed)
        else:
            philox_seed = seed
        rows = m0 + offs_m
        row_ok = rows < len_q
        q = load_rows(q_ptrs + m0 * stride_qn, row_ok, d_ok, MASKED, EVEN_D)
        do = load_rows(do_ptrs + m0 * stride_gn, row_ok, d_ok, MASKED, EVEN_D)
        if MASKED:
            # Padding rows get lse = +inf, so their probabilities are exactly 0.
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_ptr + rows)
            delta = tl.load(delta_ptr + rows)
        if DROPOUT and MASK_LAYOUT == "untransposed":
            # Scores in the forward's orientation, (BLOCK_M, BLOCK_N): each thread generates
            # exactly the dropout counters it holds (as in the forward), and P and dS reach the
            # transposed products through shared memory instead.
            pair_counters = pair_counter_base(counter_base, dropout_first_pair + m0 // 2,
                                              counters_per_row, BLOCK_M)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            p = tl.math.exp2(scores * qk_scale - lse[:, None])
            if MASKED:
                p = tl.where(visible_tile(rows, cols, len_k, upper, lower, UPPER, LOWER), p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            keep = dropout_keep_tile(philox_seed, pair_counters, n0, drop_threshold, BLOCK_M,
                                     BLOCK_N, N_ROUNDS)
            p_dropped = tl.where(keep, p, 0.0)
            dp = tl.where(keep, dp, 0.0)
            dv = tl.dot(tl.trans(p_dropped.to(do.dtype)), do, dv, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
            if ACCUMULATE_DQ:
                dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
                tl.atomic_add(dq_ptrs + m0 * stride_aqn, dq, mask=row_ok[:, None] & d_ok[None, :],
                              sem="relaxed")
        else:
            pT = transposed_probabilities(k, q, lse, rows, cols, len_k, upper, lower, qk_scale,
                                          MASKED, UPPER, LOWER, PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            if DROPOUT:
                pair_counters = pair_counter_base(counter_base, dropout_first_pair + m0 // 2,
                                                  counters_per_row, BLOCK_M)
                keep = dropout_keep_tile(philox_seed, pair_counters, n0, drop_threshold, BLOCK_M,
                                         BLOCK_N, N_ROUNDS)
                keepT = tl.trans(keep)
                pT_dropped = tl.where(keepT, pT, 0.0)
                dpT = tl.where(keepT, dpT, 0.0)
            else:
                pT_dropped = pT
            dv = tl.dot(pT_dropped.to(do.dtype), do, dv, input_precision=PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
            if ACCUMULATE_DQ:
                # This key block's share of these rows' dQ; other key blocks' programs add theirs.
                dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PRECISION)
                tl.atomic_add(dq_ptrs + m0 * stride_aqn, dq, mask=row_ok[:, None] & d_ok[None, :],
                              sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["seed", "counter_base"])
def _dkdv_kernel(
    Q, K, V, GradOut, Lse, Delta, GradK, GradV, GradQAcc, cu_seqlens, seed, counter_base,  # per call
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_gb, stride_gn, stride_gh,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_aqb, stride_aqn, stride_aqh, stride_lse_b, stride_lse_h,
    seqlen_q, seqlen_k, heads_q, group_size, window_left, window_right,
    softmax_scale, qk_scale, counters_per_row, drop_threshold, drop_rescale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPPER: tl.constexpr, LOWER: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr, MASK_LAYOUT: tl.constexpr,
    ACCUMULATE_DQ: tl.constexpr = False, SEED_IN_MEMORY: tl.constexpr = False,
):
    # With SEED_IN_MEMORY, seed is the address of a seed drawn on the device (_philox.py), loaded
    # inside the query-block loop.
    # GradQAcc (float32, q's shape; stride_aq*): where ACCUMULATE_DQ adds the unscaled dQ. Without
    # it, any tensor: it is not read.
    block_n = tl.program_id(0)
    head_k = tl.program_id(1)
    batch = tl.program_id(2)
    start, len_q, len_k = sequence_bounds(cu_seqlens, batch, seqlen_q, seqlen_k, VARLEN)
    n0 = block_n * BLOCK_N
    if n0 >= len_k:
        return
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    batch64 = batch.to(tl.int64)
    start64 = start.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = n0 + offs_n                  # key index inside the sequence
    col_ok = cols < len_k
    d_ok = offs_d < HEAD_DIM
    key_tokens = (start64 + n0 + offs_n)[:, None]
    k = load_rows(K + batch64 * stride_kb + head_k.to(tl.int64) * stride_kh
                  + key_tokens * stride_kn + offs_d[None, :], col_ok, d_ok, True, EVEN_D)
    v = load_rows(V + batch64 * stride_vb + head_k.to(tl.int64) * stride_vh
                  + key_tokens * stride_vn + offs_d[None, :], col_ok, d_ok, True, EVEN_D)

    # Which query blocks see this key block (the band i + lower <= j <= i + upper, _tiles.py): none
    # before the first query whose upper edge reaches key n0; partly up to the first block that
    # sees all of it; entirely from there until a query's lower edge passes key n0 (a sliding
    # window) or the last full query block, unless the key block itself is ragged; partly again
    # up to the last query whose lower edge still reaches the block's last key.
    upper = len_k - len_q + window_right
    lower = len_k - len_q - window_left
    if UPPER:
        lo = tl.maximum(n0 - upper, 0) // BLOCK_M * BLOCK_M
        partial_end = tl.maximum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - upper, 0), BLOCK_M) * BLOCK_M, lo)
    else:
        lo = 0
        partial_end = 0
    if n0 + BLOCK_N <= len_k:
        full_end = tl.maximum(len_q // BLOCK_M * BLOCK_M, partial_end)
    else:
        full_end = partial_end
    if LOWER:
        hi = tl.minimum(tl.maximum(n0 + BLOCK_N - lower, 0), len_q)
        full_end = tl.minimum(full_end, tl.maximum(tl.maximum(n0 - lower + 1, 0) // BLOCK_M * BLOCK_M,
                                                   partial_end))
    else:
        hi = len_q
    partial_end = tl.minimum(partial_end, hi)
    full_end = tl.minimum(full_end, hi)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for g in range(0, group_size):
        head = head_k * group_size + g
        q_ptrs = (Q + batch64 * stride_qb + head.to(tl.int64) * stride_qh + start64 * stride_qn
                  + offs_m[:, None] * stride_qn + offs_d[None, :])
        do_ptrs = (GradOut + batch64 * stride_gb + head.to(tl.int64) * stride_gh
                   + start64 * stride_gn + offs_m[:, None] * stride_gn + offs_d[None, :])
        dq_ptrs = (GradQAcc + batch64 * stride_aqb + head.to(tl.int64) * stride_aqh
                   + start64 * stride_aqn + offs_m[:, None] * stride_aqn + offs_d[None, :])
        row_stats = batch64 * stride_lse_b + head.to(tl.int64) * stride_lse_h + start
        dropout_first_pair = head_first_pair(batch64 * heads_q + head, seqlen_q)
        for stage in tl.static_range(3):
            if stage == 0:
                stage_lo = lo
                stage_hi = partial_end
            elif stage == 1:
                stage_lo = partial_end
                stage_hi = full_end
            else:
                stage_lo = full_end
                stage_hi = hi
            dk, dv = _dkdv_query_blocks(
                dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, stride_qn, stride_gn, stride_aqn,
                Lse + row_stats, Delta + row_stats, stage_lo, stage_hi, n0, cols, offs_m, d_ok,
                len_q, len_k, upper, lower, qk_scale, seed, counter_base, dropout_first_pair,
                counters_per_row, drop_threshold, BLOCK_M, BLOCK_N, EVEN_D, stage != 1, UPPER,
                LOWER, DROPOUT, PRECISION, N_ROUNDS, MASK_LAYOUT, ACCUMULATE_DQ, SEED_IN_MEMORY)

    if DROPOUT:
        dk *= softmax_scale * drop_rescale
        dv *= drop_rescale
    else:
        dk *= softmax_scale
    store_rows(GradK + batch64 * stride_dkb + head_k.to(tl.int64) * stride_dkh
               + key_tokens * stride_dkn + offs_d[None, :], dk.to(GradK.dtype.element_ty),
               col_ok, d_ok, EVEN_D)
    store_rows(GradV + batch64 * stride_dvb + head_k.to(tl.int64) * stride_dvh
               + key_tokens * stride_dvn + offs_d[None, :], dv.to(GradV.dtype.element_ty),
               col_ok, d_ok, EVEN_D)


@triton.jit
def _dq_key_blocks(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, lo, hi, rows,
                   offs_n, d_ok, len_k, upper, lower, qk_scale, seed, pair_counters, drop_threshold,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
                   MASKED: tl.constexpr, UPPER: tl.constexpr, LOWER: tl.constexpr,
                   DROPOUT: tl.constexpr,
                   PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        k = load_rows(k_ptrs + n0 * stride_kn, cols < len_k, d_ok, MASKED, EVEN_D)
        v = load_rows(v_ptrs + n0 * stride_vn, cols < len_k, d_ok, MASKED, EVEN_D)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.math.exp2(scores * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(visible_tile(rows, cols, len_k, upper, lower, UPPER, LOWER), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            keep = dropout_keep_tile(seed, pair_counters, n0, drop_threshold, BLOCK_M, BLOCK_N,
                                     N_ROUNDS)
            dp = tl.where(keep, dp, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed", "counter_base"])
def _dq_kernel(
    Q, K, V, GradOut, Out, Lse, Delta, GradQ, cu_seqlens, seed, counter_base,     # per call
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_gb, stride_gn, stride_gh,
    stride_ob, stride_on, stride_oh,
    stride_dqb, stride_dqn, stride_dqh, stride_lse_b, stride_lse_h,
    seqlen_q, seqlen_k, heads_q, group_size, window_left, window_right,
    softmax_scale, qk_scale, counters_per_row, drop_threshold, drop_rescale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPPER: tl.constexpr, LOWER: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr, DELTA_ONLY: tl.constexpr = False,
    SEED_IN_MEMORY: tl.constexpr = False,
):
    if SEED_IN_MEMORY:      # seed is then the address of a seed drawn on the device (_philox.py)
        seed = tl.load(seed)
    # DELTA_ONLY: store delta and stop (the fused backward's first pass; GradQ is not written).
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    head_k = head // group_size
    start, len_q, len_k = sequence_bounds(cu_seqlens, batch, seqlen_q, seqlen_k, VARLEN)
    m0 = block_m * BLOCK_M
    if m0 >= len_q:
        return
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    batch64 = batch.to(tl.int64)
    start64 = start.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    row_ok = rows < len_q
    d_ok = offs_d < HEAD_DIM
    query_tokens = (start64 + m0 + offs_m)[:, None]
    q = load_rows(Q + batch64 * stride_qb + head.to(tl.int64) * stride_qh
                  + query_tokens * stride_qn + offs_d[None, :], row_ok, d_ok, True, EVEN_D)
    do = load_rows(GradOut + batch64 * stride_gb + head.to(tl.int64) * stride_gh
                   + query_tokens * stride_gn + offs_d[None, :], row_ok, d_ok, True, EVEN_D)
    row_stats = batch64 * stride_lse_b + head.to(tl.int64) * stride_lse_h + start + rows
    lse = tl.load(Lse + row_stats, mask=row_ok, other=float("inf"))
    # delta = rowsum(dO * O), which the dK/dV pass (launched after this one) reads back.
    o = load_rows(Out + batch64 * stride_ob + head.to(tl.int64) * stride_oh
                  + query_tokens * stride_on + offs_d[None, :], row_ok, d_ok, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if DROPOUT:
        # Stored and used as delta * (1 - p): see the module docstring.
        delta = delta / drop_rescale
    tl.store(Delta + row_stats, delta, mask=row_ok)
    if DELTA_ONLY:
        return
    k_ptrs = (K + batch64 * stride_kb + head_k.to(tl.int64) * stride_kh + start64 * stride_kn
              + offs_n[:, None] * stride_kn + offs_d[None, :])
    v_ptrs = (V + batch64 * stride_vb + head_k.to(tl.int64) * stride_vh + start64 * stride_vn
              + offs_n[:, None] * stride_vn + offs_d[None, :])

    upper = len_k - len_q + window_right
    lower = len_k - len_q - window_left
    pair_counters = pair_counter_base(
        counter_base, head_first_pair(batch64 * heads_q + head, seqlen_q) + m0 // 2, counters_per_row,
        BLOCK_M)
    keys_start, full_start, full_end, keys_end = key_block_ranges(m0, len_k, upper, lower, BLOCK_M,
                                                                  BLOCK_N, UPPER, LOWER)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if LOWER:
        dq = _dq_key_blocks(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, keys_start,
                            full_start, rows, offs_n, d_ok, len_k, upper, lower, qk_scale, seed,
                            pair_counters, drop_threshold, BLOCK_M, BLOCK_N, EVEN_D, True, UPPER,
                            LOWER, DROPOUT, PRECISION, N_ROUNDS)
    dq = _dq_key_blocks(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, full_start,
                        full_end, rows, offs_n, d_ok, len_k, upper, lower, qk_scale, seed,
                        pair_counters, drop_threshold, BLOCK_M, BLOCK_N, EVEN_D, False, UPPER,
                        LOWER, DROPOUT, PRECISION, N_ROUNDS)
    dq = _dq_key_blocks(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, full_end, keys_end,
                        rows, offs_n, d_ok, len_k, upper, lower, qk_scale, seed, pair_counters,
                        drop_threshold, BLOCK_M, BLOCK_N, EVEN_D, True, UPPER, LOWER, DROPOUT,
                        PRECISION, N_ROUNDS)
    if DROPOUT:
        dq *= softmax_scale * drop_rescale
    else:
        dq *= softmax_scale
    store_rows(GradQ + batch64 * stride_dqb + head.to(tl.int64) * stride_dqh
               + query_tokens * stride_dqn + offs_d[None, :], dq.to(GradQ.dtype.element_ty),
               row_ok, d_ok, EVEN_D)
