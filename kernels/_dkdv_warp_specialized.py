"""Fused dK/dV/dQ pass for Hopper (sm_90) in Gluon, laid out as FlashAttention-3's backward: two
consumer warpgroups and a producer warp, one program per 128-key block.

Why: the single-warpgroup Gluon pass (``_dkdv_gluon.py``) holds a whole key block's dK and dV
(2 x 128 x head_dim float32) beside its score tiles; at head dim 128 that leaves no registers to
overlap the products with the elementwise work. Here each consumer warpgroup c owns 64 keys
(n0 + 64c .. n0 + 64c + 63) and their dK and dV, and a producer warp loads K and V once, then Q
and dO of each 64-query block into STAGES shared-memory stages. Per query block, each consumer:

    S_c = Q·K_cᵀ, dP_c = dO·V_cᵀ          (64 queries x 64 keys, untransposed: lse and δ are per
                                            row, 2 registers each; transposed tiles need them per
                                            column, 16 each, and spilled)
    P_c = exp2(S_c·scale − lse)           -> shared; dV_c += P_cᵀ·dO issued at once (as FA3 does),
                                            running while dS is computed
    dS_c = P_c∘(dP_c − δ)                 -> columns 64c.. of a shared 64 x 128 tile
    dK_c += dS_cᵀ·Q
    once both halves of dS are written:   dQ[:, 64c:64c+64] = dS·K[:, 64c:64c+64]
                                          -> shared -> one TMA reduce-add into the float32 dQ sum

so each block's dQ is one product per consumer over all 128 keys: five products per block, as in
the other fused passes. (At head dim 64 dQ has 64 columns, one product over all 128 keys: the
consumers take it in turn, a block each, and take it a block late, while the next block's S and
dP run, so neither waits for the other's half of dS. Against taking it within the block, dK/dV
kernel time measured -2.5 to -4.5 % at 4K-8K causal, -7.5 % at 4K without a mask in the
persistent grid and -5 % with dropout, attention_notes v27.) The causal mask is one comparison
per row; at head dim 128 without dropout every block applies it, without a branch (the branch
made ptxas spill inside the loop, the consumers being at their 240-register limit), elsewhere
only the blocks holding a query before one of the consumer's keys (``_causal_probabilities``,
attention_notes v33). With dropout each consumer regenerates its 64 x 64
tile of the forward's keep-mask from the seed and counters (``_philox_gluon.keep_tile``): the tile
is untransposed, in the forward's layout, so each thread computes only the counters it holds.

Measured on an H200 (bf16, hidden 2048; attention_notes.md v20-v22), whole backward against the
previous defaults: head dim 128 +7 to +30 % without a mask (1K-16K), +9 to +24 % causal from 4K;
64 +3 to +9 % from 2K / 4K; with dropout +5 to +34 %. Short calls run it in a persistent grid
(``_dkdv_ws_persistent.py``). MASK_PARTITION: the keep-masks drawn by warps of their own
(``_dropout_mask_partition.py``); the default only where it won (``MASK_PARTITION_SEQLEN``).
TMA_GRADS: dK and dV leave through shared memory by TMA stores (``store_key_gradients``), where
``_backward.key_gradients_by_tma`` allows and the tiles do not ask for ``register_grads``.

The same arguments as ``_backward_kernels._dkdv_kernel`` (launch plans pass them), with
ACCUMULATE_DQ, for the calls ``_hopper.gluon_dkdv_call`` lets through: padded
input, fp16/bf16, head dim 64 or 128, one query head per kv-head, no window, whole 64-query and
128-key blocks, and with the causal mask as many queries as keys. δ comes from the portable
delta-only pass, launched first; ``_backward.finish_dq`` applies dQ's scale.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

from ._dkdv_ws_setup import (ROWS, check_tiles, p_slot, store_key_gradients,
                              tiles_and_barriers)
from ._dropout_mask_partition import mask_buffers, mask_partition, read_keep
from ._gluon_shared import head_descriptor, heavy_first, tma_reduce_add
from ._philox_gluon import dropout_arguments, keep_tile


def causal_order_group(seqlen_k: int) -> int:
    """How many (batch, head) pairs the causal grid takes at a time, heaviest key block first
    (_gluon_shared.heavy_first; the kernel's ORDER_GROUP).

    Four below 16K keys: whole backward at head dim 128 against one pair at a time, two processes
    (attention_notes v28), -0.6 / -1.2 / -2.5 / -0.3 % at 1K / 2K / 4K / 8K; eight pairs at a time
    were level at 4K and 1 % slower at 8K. One from 16K: at head dim 128 (16 heads, one sequence)
    four pairs took 5.45-5.54 ms against 5.30-5.32 (v30, two processes each); at head dim 64
    level, and there the persistent pass runs instead."""
    return 4 if seqlen_k < 16384 else 1


@gluon.jit
def _producer(descs, buffers, bars, n0, first, n_items, STAGES: gl.constexpr):
    """One warp: K and V of the key block, then Q and dO of each query block as stages free up."""
    q_desc, do_desc, k_desc, v_desc, dq_desc = descs
    q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, p_smem = buffers
    kv_bar, qdo_full, qdo_empty, ds_full, ds_empty = bars
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [n0, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [n0, 0], kv_bar, v_smem)
    for index in range(n_items):
        stage = index % STAGES
        # A fresh barrier counts as having completed phase 1: the first pass needs no release.
        mbarrier.wait(qdo_empty.index(stage), ((index // STAGES) & 1) ^ 1)
        mbarrier.expect(qdo_full.index(stage),
                        q_desc.block_type.nbytes + do_desc.block_type.nbytes)
        row = (first + index) * ROWS
        tma.async_copy_global_to_shared(q_desc, [row, 0], qdo_full.index(stage),
                                        q_smem.index(stage))
        tma.async_copy_global_to_shared(do_desc, [row, 0], qdo_full.index(stage),
                                        do_smem.index(stage))


@gluon.jit
def _reduce_dq(dq, dq_buffer, dq_desc, row, col):
    """dQ's 64 x 64 tile to the float32 sum: the consumer's staging buffer free (its previous
    reduce has read it), written by every warp, then one bulk reduce-add."""
    tma.store_wait(0)
    gl.thread_barrier()
    dq_buffer.store(dq)
    fence_async_shared()
    gl.thread_barrier()
    tma_reduce_add(dq_desc, [row, col], dq_buffer)


@gluon.jit
def _query_blocks(c: gl.constexpr, descs, buffers, bars, dk, dv, stats, dropout, first, n_blocks,
                  n0, base, q_row0, dq_col0, qk_scale, CAUSAL_MASK: gl.constexpr,
                  DROPOUT: gl.constexpr, N_ROUNDS: gl.constexpr, STAGES: gl.constexpr,
                  HEAD_DIM: gl.constexpr, s_layout: gl.constexpr, dq_layout: gl.constexpr,
                  masks=0, MASK_PARTITION: gl.constexpr = False, TMA_GRADS: gl.constexpr = False):
    """Consumer c's share of query blocks ``first`` .. ``n_blocks`` - 1: returns its dK and dV (dK
    unscaled, and without dropout's rescale). Stage and barrier phases count from ``base`` (the
    query blocks the program took before this key block: 0 here, more in the persistent pass);
    dQ's tile of query block b goes to row ``q_row0`` + 64b, column ``dq_col0`` + 64c of
    ``dq_desc``. ``dropout``: ``_philox_gluon.dropout_arguments``'s tuple (0 without dropout);
    with MASK_PARTITION the keep-masks are read from ``masks`` (``_dropout_mask_partition.py``);
    with TMA_GRADS P takes the first half of the consumer's P slot (``p_slot``)."""
    q_desc, do_desc, k_desc, v_desc, dq_desc = descs
    q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, p_smem = buffers
    kv_bar, qdo_full, qdo_empty, ds_full, ds_empty = bars
    lse_ptr, delta_ptr = stats
    dtype: gl.constexpr = q_smem.dtype
    p_tile = p_slot(p_smem, c, TMA_GRADS)
    k_rows = k_smem.slice(c * ROWS, ROWS, dim=0)        # this consumer's keys
    v_rows = v_smem.slice(c * ROWS, ROWS, dim=0)
    if HEAD_DIM == ROWS:    # dQ's 64 columns, computed by the consumers in turn
        k_cols = k_smem
        dq_col = dq_col0
    else:                   # all keys, this consumer's 64 dQ columns
        k_cols = k_smem.slice(c * ROWS, ROWS, dim=1)
        dq_col = dq_col0 + c * ROWS
    zeros = gl.zeros([ROWS, ROWS], gl.float32, s_layout)
    rows_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    # At head dim 64 with dropout each block's log-sum-exp and delta rows are loaded one block
    # ahead, so the loads' latency is spent under the previous block, not behind the keep-mask's
    # Philox rounds (attention_notes v26: -4 to -5 % at 2K-8K causal). Elsewhere they are loaded
    # per block: without dropout the carried loads cost 2.5-3.5 %, at head dim 128 (consumers at
    # their register limit) 25 %.
    PREFETCH_STATS: gl.constexpr = DROPOUT and HEAD_DIM == ROWS
    if PREFETCH_STATS:
        rows = gl.arange(0, ROWS, layout=rows_layout)
        lse_next = gl.load(lse_ptr + first * ROWS + rows)
        delta_next = gl.load(delta_ptr + first * ROWS + rows)
    for block in range(first, n_blocks):
        index = base + block - first
        stage = index % STAGES
        mbarrier.wait(qdo_full.index(stage), (index // STAGES) & 1)
        s = warpgroup_mma(q_smem.index(stage), k_rows.permute((1, 0)), zeros, use_acc=False,
                          is_async=True)
        dp = warpgroup_mma(do_smem.index(stage), v_rows.permute((1, 0)), zeros, use_acc=False,
                           is_async=True)
        if PREFETCH_STATS:
            lse = lse_next
            delta = delta_next
            following = gl.minimum(block + 1, n_blocks - 1) * ROWS + rows    # the last: itself
            lse_next = gl.load(lse_ptr + following)
            delta_next = gl.load(delta_ptr + following)
        else:
            queries = block * ROWS + gl.arange(0, ROWS, layout=rows_layout)
            lse = gl.load(lse_ptr + queries)
            delta = gl.load(delta_ptr + queries)
        if HEAD_DIM == ROWS:
            if block > first:
                if (index - 1) % 2 == c:
                    # The previous block's dQ, this consumer's turn: taken a block late, while
                    # this block's S and dP run, so the other consumer's half of that dS is
                    # written by now and neither consumer waits for the other within a block.
                    # (Taken before S and dP are issued instead, it measured 1-6 % slower.)
                    _late_dq(ds_smem, ds_full, ds_empty, k_cols, dq_smem.index(c), dq_desc,
                             index - 1, q_row0 + (block - 1) * ROWS, dq_col, dq_layout)
        if DROPOUT and not MASK_PARTITION:
            # The block's keep-mask, regenerated from the seed and counters as the forward drew
            # it, while S and dP are computed: the tile is in the forward's orientation, so each
            # thread computes only the Philox counters it holds. Dropped entries leave P (for dV)
            # and dP; dS = P∘(dP − δ) keeps the undropped P, δ being stored times (1 − p)
            # (_backward_kernels.py).
            seed, counter_base, first_pair, counters_per_row, threshold = dropout
            keep = keep_tile(seed, counter_base, first_pair + block * (ROWS // 2),
                             counters_per_row, n0 + c * ROWS, threshold, ROWS, ROWS, N_ROUNDS,
                             s_layout)
        s, dp = warpgroup_mma_wait(num_outstanding=0, deps=(s, dp))
        if DROPOUT and MASK_PARTITION:
            keep = read_keep(masks, index, c, s_layout)
        p = gl.exp2(s * qk_scale - lse[:, None])
        if CAUSAL_MASK:     # key j visible to query i when j <= i (as many queries as keys)
            offset = n0 + c * ROWS - block * ROWS
            # Head dim 128 without dropout: every block, no branch (where offset <= -64 the mask
            # keeps every entry; the branch made ptxas spill in the loop). Elsewhere only blocks
            # with a query before one of this consumer's keys. Forms: _causal_probabilities.
            if HEAD_DIM > ROWS and not DROPOUT:
                p = _causal_probabilities(p, offset, s_layout, False)
            elif offset >= 0:
                p = _causal_probabilities(p, offset, s_layout, HEAD_DIM > ROWS)
        p_dropped = p
        if DROPOUT:
            p_dropped = gl.where(keep, p, 0.0)
            dp = gl.where(keep, dp, 0.0)
        # P into this consumer's tile (its last reader, the previous block's dV product, was
        # waited for), and dV's product started on it while dS is computed.
        p_tile.store(p_dropped.to(dtype))
        fence_async_shared()            # visible to the tensor cores' (async) reads
        gl.thread_barrier()             # every warp of this warpgroup has written its share
        dv = warpgroup_mma(p_tile.permute((1, 0)), do_smem.index(stage), dv,
                           is_async=True)
        ds = p * (dp - delta[:, None])
        # dS into this consumer's columns of the shared tile, once both consumers' products of
        # block - 2 (same buffer) have read it.
        buffer = index % 2
        mbarrier.wait(ds_empty.index(buffer), ((index // 2) & 1) ^ 1)
        ds_cols = ds_smem.index(buffer).slice(c * ROWS, ROWS, dim=1)
        ds_cols.store(ds.to(dtype))
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(ds_full.index(buffer), count=1)
        dk = warpgroup_mma(ds_cols.permute((1, 0)), q_smem.index(stage), dk, is_async=True)
        if HEAD_DIM > ROWS:     # this consumer's 64 of dQ's 128 columns, every block
            mbarrier.wait(ds_full.index(buffer), (index // 2) & 1)
            dq = warpgroup_mma(ds_smem.index(buffer), k_cols,
                               gl.zeros([ROWS, ROWS], gl.float32, dq_layout), use_acc=False,
                               is_async=True)
            dk, dv, dq = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv, dq))
            mbarrier.arrive(qdo_empty.index(stage), count=1)
            mbarrier.arrive(ds_empty.index(buffer), count=1)
            _reduce_dq(dq, dq_smem.index(c), dq_desc, q_row0 + block * ROWS, dq_col)
        else:
            # dQ's 64 columns are one product over all 128 keys: the consumers take it in turn
            # (consumer c on blocks whose index is c mod 2), so neither does six products per
            # block while the other does four, and a block late (_late_dq). dK and dV are
            # waited for here, at the block's end (an asynchronous accumulator cannot cross the
            # next block's runtime branch), and the stage's Q and dO released.
            dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
            mbarrier.arrive(qdo_empty.index(stage), count=1)
            if index % 2 != c:      # done with its dS columns; the other consumer reads them
                mbarrier.arrive(ds_empty.index(buffer), count=1)
    if HEAD_DIM == ROWS:        # the last block's dQ, if it is this consumer's turn
        if n_blocks > first:
            last = base + n_blocks - 1 - first
            if last % 2 == c:
                _late_dq(ds_smem, ds_full, ds_empty, k_cols, dq_smem.index(c), dq_desc, last,
                         q_row0 + (n_blocks - 1) * ROWS, dq_col, dq_layout)
    return dk, dv


@gluon.jit
def _causal_probabilities(p, offset, s_layout: gl.constexpr, TILE_DIFFERENCE: gl.constexpr):
    """P with key j of the block (this consumer's key ``offset`` + j among the block's queries)
    zeroed for query i when j > i - offset. The comparison is made per row (i - offset against
    each j) or, with TILE_DIFFERENCE, on the 2-D tile of j - i: the same mask, but ptxas
    allocates the two differently. Against the tile form under the branch, whole backward,
    causal (attention_notes v33): the per-row form under the branch -1.5 to -2.5 % at head dim
    64, -5 to -6.5 % with dropout, and +1 to +2 % at 128 with dropout (2K-8K); at 128 without
    dropout, per row and without the branch, -4 to -8 % at 1K-2K, -1 to -3 % at 4K-8K, -2 to
    +2 % at 16K."""
    local_keys = gl.arange(0, ROWS, layout=gl.SliceLayout(0, s_layout))
    local_queries = gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    if TILE_DIFFERENCE:
        return gl.where(local_keys[None, :] - local_queries[:, None] <= -offset, p, 0.0)
    return gl.where(local_keys[None, :] <= (local_queries - offset)[:, None], p, 0.0)


@gluon.jit
def _late_dq(ds_smem, ds_full, ds_empty, k_cols, dq_buffer, dq_desc, index, row, col,
             dq_layout: gl.constexpr):
    """dQ of the block ``index`` at head dim 64 (all 128 keys) once both halves of its dS are
    written; the dS buffer released, then the reduce."""
    buffer = index % 2
    mbarrier.wait(ds_full.index(buffer), (index // 2) & 1)
    dq = warpgroup_mma(ds_smem.index(buffer), k_cols,
                       gl.zeros([ROWS, ROWS], gl.float32, dq_layout), use_acc=False)
    mbarrier.arrive(ds_empty.index(buffer), count=1)
    _reduce_dq(dq, dq_buffer, dq_desc, row, col)


@gluon.jit
def _consumer(c: gl.constexpr, descs, buffers, bars, stats, dropout, masks, out_args, n0, first,
              n_blocks, scales, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, DROPOUT: gl.constexpr, N_ROUNDS: gl.constexpr,
              MASK_PARTITION: gl.constexpr, TMA_GRADS: gl.constexpr):
    """Consumer c: dK and dV of keys n0 + 64c .. n0 + 64c + 63, and its columns of each block's dQ.
    ``scales``: (qk_scale, softmax_scale, drop_rescale); ``out_args``: dK's and dV's TMA
    descriptors with TMA_GRADS, else (pointer, row stride) of each."""
    qk_scale, softmax_scale, drop_rescale = scales
    kv_bar = bars[0]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, ROWS, 16])
    g_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, ROWS, 16])
    dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, g_layout)
    dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, g_layout)
    mbarrier.wait(kv_bar, 0)
    dk, dv = _query_blocks(c, descs, buffers, bars, dk, dv, stats, dropout, first, n_blocks, n0,
                           0, 0, 0, qk_scale, CAUSAL, DROPOUT, N_ROUNDS, STAGES, HEAD_DIM,
                           s_layout, dq_layout, masks, MASK_PARTITION, TMA_GRADS)
    dk = dk * softmax_scale
    if DROPOUT:     # kept entries are scaled by 1 / (1 - p), as in the portable pass
        dk = dk * drop_rescale
        dv = dv * drop_rescale
    if TMA_GRADS:
        q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, p_smem = buffers
        dk_desc, dv_desc = out_args
        store_key_gradients(c, dk, dv, p_smem, dq_smem, dk_desc, dv_desc, n0 + c * ROWS, 0,
                            HEAD_DIM)
        tma.store_wait(0)          # shared memory is read before the program ends
    else:
        # (Waited for before these stores, as before TMA_GRADS: the same machine code.)
        tma.store_wait(0)          # shared memory is read before the program ends
        grad_k, stride_dkn, grad_v, stride_dvn = out_args
        rows = n0 + c * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, g_layout))
        cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, g_layout))
        rows64 = rows.to(gl.int64)[:, None]
        gl.store(grad_k + rows64 * stride_dkn + cols[None, :],
                 dk.to(grad_k.dtype.element_ty))
        gl.store(grad_v + rows64 * stride_dvn + cols[None, :], dv.to(grad_v.dtype.element_ty))


@gluon.jit(do_not_specialize=["seed", "counter_base"])
def _dkdv_warp_specialized_kernel(
    Q, K, V, GradOut, Lse, Delta, GradK, GradV, GradQAcc, cu_seqlens, seed, counter_base,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_gb, stride_gn, stride_gh,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_aqb, stride_aqn, stride_aqh, stride_lse_b, stride_lse_h,
    seqlen_q, seqlen_k, heads_q, group_size, window_left, window_right,
    softmax_scale, qk_scale, counters_per_row, drop_threshold, drop_rescale,
    HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    UPPER: gl.constexpr, LOWER: gl.constexpr, DROPOUT: gl.constexpr, VARLEN: gl.constexpr,
    PRECISION: gl.constexpr, N_ROUNDS: gl.constexpr, MASK_LAYOUT: gl.constexpr,
    STAGES: gl.constexpr, num_warps: gl.constexpr, ACCUMULATE_DQ: gl.constexpr = False,
    SEED_IN_MEMORY: gl.constexpr = False, ORDER_GROUP: gl.constexpr = 4,
    MASK_PARTITION: gl.constexpr = False, TMA_GRADS: gl.constexpr = False,
):
    check_tiles(HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, LOWER, VARLEN, ACCUMULATE_DQ, STAGES, num_warps)
    dtype: gl.constexpr = Q.dtype.element_ty
    if UPPER:
        tile = gl.program_id(0) + gl.num_programs(0) * (gl.program_id(1)
                                                        + gl.num_programs(1) * gl.program_id(2))
        block_n, pair = heavy_first(tile, gl.num_programs(0),
                                    gl.num_programs(1) * gl.num_programs(2), ORDER_GROUP)
        head = pair % gl.num_programs(1)
        batch = pair // gl.num_programs(1)
    else:
        block_n = gl.program_id(0)
        head = gl.program_id(1)
        batch = gl.program_id(2)
    n0 = block_n * BLOCK_N
    batch64 = batch.to(gl.int64)
    head64 = head.to(gl.int64)

    q_desc = head_descriptor(Q, batch, stride_qb, head, stride_qh, seqlen_q, stride_qn, ROWS,
                             HEAD_DIM)
    do_desc = head_descriptor(GradOut, batch, stride_gb, head, stride_gh, seqlen_q, stride_gn,
                              ROWS, HEAD_DIM)
    k_desc = head_descriptor(K, batch, stride_kb, head, stride_kh, seqlen_k, stride_kn, BLOCK_N,
                             HEAD_DIM)
    v_desc = head_descriptor(V, batch, stride_vb, head, stride_vh, seqlen_k, stride_vn, BLOCK_N,
                             HEAD_DIM)
    dq_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, ROWS], gl.float32)
    dq_desc = tma.make_tensor_descriptor(GradQAcc + batch64 * stride_aqb + head64 * stride_aqh,
                                         [seqlen_q, HEAD_DIM], [stride_aqn, 1], [ROWS, ROWS],
                                         dq_layout)
    if DROPOUT and MASK_PARTITION:      # allocated before the shared fence
        masks = mask_buffers()
    buffers, bars = tiles_and_barriers(dtype, HEAD_DIM, BLOCK_N, STAGES, 1, TMA_GRADS)
    # One key block per program: its K/V buffer and barrier.
    q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, p_smem = buffers
    buffers = (q_smem, do_smem, k_smem.index(0), v_smem.index(0), ds_smem, dq_smem, p_smem)
    kv_full, qdo_full, qdo_empty, ds_full, ds_empty = bars
    bars = (kv_full.index(0), qdo_full, qdo_empty, ds_full, ds_empty)

    n_blocks = seqlen_q // ROWS
    if UPPER:       # the first query block with a query that sees one of these keys
        first = n0 // ROWS
    else:
        first = 0
    n_items = n_blocks - first
    row_stats = batch64 * stride_lse_b + head64 * stride_lse_h
    stats = (Lse + row_stats, Delta + row_stats)
    descs = (q_desc, do_desc, k_desc, v_desc, dq_desc)
    if TMA_GRADS:
        out_args = (head_descriptor(GradK, batch, stride_dkb, head, stride_dkh, seqlen_k,
                                    stride_dkn, ROWS, HEAD_DIM),
                    head_descriptor(GradV, batch, stride_dvb, head, stride_dvh, seqlen_k,
                                    stride_dvn, ROWS, HEAD_DIM))
    else:
        out_args = (GradK + batch64 * stride_dkb + head64 * stride_dkh, stride_dkn,
                    GradV + batch64 * stride_dvb + head64 * stride_dvh, stride_dvn)
    if DROPOUT:
        dropout = dropout_arguments(seed, counter_base, batch, heads_q, head, seqlen_q, 0,
                                    counters_per_row, drop_threshold, SEED_IN_MEMORY)
    else:
        dropout = 0
    scales = (qk_scale, softmax_scale, drop_rescale)
    if DROPOUT and MASK_PARTITION:      # the keep-masks from two warps of their own
        gl.warp_specialize([
            (_consumer, (0, descs, buffers, bars, stats, dropout, masks, out_args, n0, first,
                         n_blocks, scales, HEAD_DIM, STAGES, UPPER, DROPOUT, N_ROUNDS, True,
                         TMA_GRADS)),
            (_consumer, (1, descs, buffers, bars, stats, dropout, masks, out_args, n0, first,
                         n_blocks, scales, HEAD_DIM, STAGES, UPPER, DROPOUT, N_ROUNDS, True,
                         TMA_GRADS)),
            (_producer, (descs, buffers, bars, n0, first, n_items, STAGES)),
            (mask_partition, (masks, dropout, n0, first, n_items, N_ROUNDS)),
        ], [4, 1, 2], [240, 24, 24])
    else:
        gl.warp_specialize([
            (_consumer, (0, descs, buffers, bars, stats, dropout, 0, out_args, n0, first,
                         n_blocks, scales, HEAD_DIM, STAGES, UPPER, DROPOUT, N_ROUNDS, False,
                         TMA_GRADS)),
            (_consumer, (1, descs, buffers, bars, stats, dropout, 0, out_args, n0, first,
                         n_blocks, scales, HEAD_DIM, STAGES, UPPER, DROPOUT, N_ROUNDS, False,
                         TMA_GRADS)),
            (_producer, (descs, buffers, bars, n0, first, n_items, STAGES)),
        ], [4, 1], [240, 24])
