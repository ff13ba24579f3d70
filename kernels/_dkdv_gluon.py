"""dK/dV pass for Hopper (sm_90) written in Gluon: the next query block's two score-side products in
flight while the current block's dV and dK products run, with Q and dO arriving by TMA.

Why: the portable dK/dV pass (``_backward_kernels._dkdv_kernel``) waits on each of its four products as it
issues it, so its elementwise work (the probabilities recomputed from lse, dS = P∘(dP − δ)) never
overlaps a product. Per key block (K and V held in shared memory, loaded once), for query blocks
i = first .. last:

    Sᵀ_i = K·Q_iᵀ, dPᵀ_i = V·dO_iᵀ          (issued asynchronously, then waited for)
    Pᵀ_i = exp2(Sᵀ_i·scale − lse_i), dSᵀ_i = Pᵀ_i∘(dPᵀ_i − δ_i)
    dV += Pᵀ_i·dO_i, dK += dSᵀ_i·Q_i

and the loop issues Sᵀ_{i+1} and dPᵀ_{i+1} before dV and dK of block i, waits for the first two
only, computes block i+1's elementwise step while block i's dV and dK products run, then waits for
them before their stage of Q/dO is reused. Q and dO arrive by TMA into STAGES shared-memory
stages (one mbarrier each); a stage is refilled at the top of the iteration after the one that
used it, STAGES - 2 blocks ahead of the block that iteration waits for, so STAGES >= 3.

With dropout each block's keep-mask is regenerated from the seed and counters exactly as the
portable passes do (``_philox_gluon.keep_tile_transposed``): by default built in the forward's
orientation, where each thread runs Philox only for the counters it holds, and moved to the
transposed tile through shared memory (``MASK_LAYOUT="untransposed"``), or built in the
transposed tile directly ("broadcast", 4x the Philox work). Dropped entries of Pᵀ and dPᵀ are 0
and the 1 / (1 - p) scale is applied to dK and dV once, at the end, as in the portable pass.

With ``ACCUMULATE_DQ`` the pass is the whole backward but δ (FlashAttention-2's single pass, as
the portable pass's fused form): block i's dSᵀ also goes to shared memory, a fifth product
dQᵀ_i = Kᵀ·dSᵀ_i (head_dim rows, so a warpgroup product even for 32-query blocks) is issued
first, and its float32 tile is staged in shared memory and added to ``GradQAcc`` by the copy
engine (a TMA reduce-add, issued after the next iteration's barrier), not by per-element atomics,
which cost 1.5-2x more time (attention_notes v15); ``_backward.finish_dq`` applies the scale.
Five products per block instead of the two passes' seven, and one keep-mask regeneration
instead of two. With 32-query blocks it is slower than the defaults in every cell measured on
the H200 (v15). With 64-query blocks (``IN_TURN``) the next block's tiles no longer fit beside
this one's elementwise step, and the blocks' elementwise steps run one after another, the next
block's Sᵀ and dPᵀ overlapping this block's dQ write (``_dkdv_gluon_steps._query_blocks_in_turn``:
one dSᵀ and one dQ buffer, STAGES >= 2); that form was the default at head dim 64 for long calls
(attention_notes v16, v17) until the warp-specialized pass beat it on every one of them (v21, v22);
it runs through explicit tiles.

The same arguments as ``_backward_kernels._dkdv_kernel`` (launch plans pass them), for the calls
``_hopper.gluon_dkdv_call`` lets through: padded input, fp16/bf16, head_dim 64 or 128, one query
head per kv-head, no window, whole query and key blocks, and with the causal mask as many queries
as keys (its mask is the plain diagonal). δ comes from the dQ pass, launched first.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

from ._dkdv_gluon_steps import (_elementwise_step, _issue_score_tiles, _load_query_block,
                                _query_blocks_in_turn, _row_statistics)
from ._gluon_shared import head_descriptor, tma_reduce_add
from ._philox_gluon import dropout_arguments


@gluon.jit
def _stage_ds(ds, block, dq_out, dtype: gl.constexpr):
    """Write query block ``block``'s dSᵀ into its half of the double buffer, for its dQᵀ product
    (whose B operand must be in shared memory). The other half may still be read by the previous
    block's product; the barrier every warp passes before that product is issued makes the
    writes of all warps complete."""
    dq_out[0].index(block % 2).store(ds.to(dtype))
    fence_async_shared()       # the writes visible to the tensor cores' (async) reads


@gluon.jit
def _issue_dq(k_smem, block, dq_out, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
              dq_layout: gl.constexpr):
    """Start dQᵀ = Kᵀ·dSᵀ of query block ``block`` (its dSᵀ staged, and a barrier passed since)."""
    zeros = gl.zeros([HEAD_DIM, BLOCK_M], gl.float32, dq_layout)
    return warpgroup_mma(k_smem.permute((1, 0)), dq_out[0].index(block % 2), zeros,
                         use_acc=False, is_async=True)


# Shared tiles that query blocks' dQ passes through on its way to the float32 sum: block b's
# is b % DQ_BUFFERS, so a tile is rewritten three blocks later and its copy (issued one
# block later) has had two iterations to read it.
DQ_BUFFERS = gl.constexpr(3)


@gluon.jit
def _stage_dq(dq, block, dq_out):
    """Write query block ``block``'s dQᵀ tile (head_dim × BLOCK_M, unscaled, float32) into its
    shared buffer, transposed to dQ's (query, head_dim) order, for ``_reduce_dq``."""
    dq_out[2].index(block % DQ_BUFFERS).permute((1, 0)).store(dq)
    fence_async_shared()       # the writes visible to the copy engine's reads


@gluon.jit
def _reduce_dq(block, dq_out, BLOCK_M: gl.constexpr):
    """Add query block ``block``'s staged tile (every warp's share written, a barrier passed since)
    to the float32 dQ sum, into which the programs of other key blocks add their shares."""
    tma_reduce_add(dq_out[1], [block * BLOCK_M, 0], dq_out[2].index(block % DQ_BUFFERS))


@gluon.jit
def _before_barrier(ACCUMULATE_DQ: gl.constexpr):
    """Before the barrier that precedes a block's dQ staging: the copy issued three blocks earlier
    from the same buffer has finished reading it (one later copy may still run)."""
    if ACCUMULATE_DQ:
        tma.store_wait(DQ_BUFFERS - 2)


@gluon.jit
def _query_blocks(k_smem, v_smem, q_desc, do_desc, q_smem, do_smem, bars, s, dp, p, ds, dk, dv,
                  lse_ptr, delta_ptr, first, begin, end, n_items, n0, qk_scale, dropout, dq_out,
                  dtype: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, CAUSAL_MASK: gl.constexpr, DROPOUT: gl.constexpr,
                  N_ROUNDS: gl.constexpr, MASK_LAYOUT: gl.constexpr, ACCUMULATE_DQ: gl.constexpr,
                  HEAD_DIM: gl.constexpr, num_warps: gl.constexpr, s_layout: gl.constexpr,
                  a_layout: gl.constexpr, dq_layout: gl.constexpr):
    """Query blocks ``begin`` .. ``end`` - 1, overlapped: on entry ``p`` and ``ds`` hold block
    begin - 1's tiles (not yet multiplied into dV and dK); on exit block end - 1's. ``first`` is
    this program's first query block (stage indices count from it). ``dq_out`` = (dSᵀ double
    buffer, the TMA descriptor of this head's float32 dQ sum, the dQ staging buffers), used with
    ``ACCUMULATE_DQ``: there block begin - 1's dSᵀ is staged on entry, and block end - 1's on exit;
    on entry the dQ of the blocks before begin - 1 is staged and the copies to the sum issued for
    all but the last of them (begin - 2), whose copy the first iteration issues."""
    for following in range(begin, end):
        current = following - 1
        # Every warpgroup has finished block current - 1's products (waited at the end of the last
        # iteration) before its stage is refilled with block current - 1 + STAGES; and every warp
        # has staged block current's dSᵀ before its dQᵀ product reads it, and block current - 1's
        # dQ before the copy engine reads it.
        _before_barrier(ACCUMULATE_DQ)
        gl.thread_barrier()
        if ACCUMULATE_DQ:
            if current > first:
                _reduce_dq(current - 1, dq_out, BLOCK_M)
        _load_query_block(q_desc, do_desc, q_smem, do_smem, bars, current - first + STAGES - 1,
                          current + STAGES - 1, n_items, BLOCK_M, STAGES)
        if ACCUMULATE_DQ:
            # First, so that it completes first: its accumulator is freed (staged in shared memory)
            # before the elementwise step, the point of highest register use.
            dq = _issue_dq(k_smem, current, dq_out, HEAD_DIM, BLOCK_M, dq_layout)
        index = following - first
        stage = index % STAGES
        mbarrier.wait(bars.index(stage), (index // STAGES) & 1)
        s = warpgroup_mma(k_smem, q_smem.index(stage).permute((1, 0)), s, use_acc=False,
                          is_async=True)
        dp = warpgroup_mma(v_smem, do_smem.index(stage).permute((1, 0)), dp, use_acc=False,
                           is_async=True)
        stage = (current - first) % STAGES
        dv = warpgroup_mma(gl.convert_layout(p.to(dtype), a_layout), do_smem.index(stage), dv,
                           is_async=True)
        dk = warpgroup_mma(gl.convert_layout(ds.to(dtype), a_layout), q_smem.index(stage), dk,
                           is_async=True)
        if ACCUMULATE_DQ:
            # Products complete in issue order: four outstanding means dQᵀ is done.
            dq = warpgroup_mma_wait(num_outstanding=4, deps=(dq, ))
            _stage_dq(dq, current, dq_out)
        lse, delta = _row_statistics(lse_ptr, delta_ptr, following, BLOCK_M, s_layout)
        # Two outstanding: Sᵀ and dPᵀ of the following block are done while dV and dK of the
        # current one may still run under its elementwise step.
        s, dp = warpgroup_mma_wait(num_outstanding=2, deps=(s, dp))
        p, ds = _elementwise_step(s, dp, lse, delta, following, n0, qk_scale, dropout, BLOCK_M,
                                  BLOCK_N, CAUSAL_MASK, DROPOUT, N_ROUNDS, MASK_LAYOUT, num_warps,
                                  s_layout)
        if ACCUMULATE_DQ:
            _stage_ds(ds, following, dq_out, dtype)
        dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))
    return s, dp, p, ds, dk, dv


# The signature of _backward_kernels._dkdv_kernel (launch plans pass the same arguments), plus STAGES
# and num_warps.
@gluon.jit(do_not_specialize=["seed", "counter_base"])
def _dkdv_gluon_kernel(
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
    SEED_IN_MEMORY: gl.constexpr = False,
):
    # UPPER is the causal mask here (no window: _hopper.gluon_dkdv_call), with as many queries as
    # keys, and group_size is 1.
    gl.static_assert(not (LOWER or VARLEN), "windows and packed input run the portable kernel")
    # The keep-mask's counters cover 16-row pairs and 32-column blocks (_philox.py).
    gl.static_assert(not DROPOUT or (BLOCK_M % 16 == 0 and BLOCK_N % 32 == 0),
                     "dropout needs query blocks of 16 rows and key blocks of 32 columns")
    gl.static_assert(HEAD_DIM == BLOCK_D, "head_dim must be a power of two (64 or 128)")
    # The fused pass with 64-query tiles takes its blocks one after another (_query_blocks_in_turn).
    IN_TURN: gl.constexpr = ACCUMULATE_DQ and BLOCK_M >= 64
    # The overlapped loop refills a block's stage at the top of the iteration after its products:
    # with 2 stages the refill would be the very block that iteration waits for, so nothing is
    # loaded ahead. The in-turn loop refills it as soon as the block is done, so 2 suffice there.
    gl.static_assert(STAGES >= 3 or (IN_TURN and STAGES >= 2),
                     "the next query block must be in flight: 3 stages or more")
    # dQᵀ's head_dim rows are split across the warps, 16 each: none may be left without rows.
    gl.static_assert(not ACCUMULATE_DQ or HEAD_DIM >= 16 * num_warps,
                     "the fused pass needs head_dim >= 16 * num_warps")
    dtype: gl.constexpr = Q.dtype.element_ty

    block_n = gl.program_id(0)
    head = gl.program_id(1)          # = the kv-head: one query head per kv-head
    batch = gl.program_id(2)
    n0 = block_n * BLOCK_N
    batch64 = batch.to(gl.int64)
    head64 = head.to(gl.int64)

    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_desc = head_descriptor(Q, batch, stride_qb, head, stride_qh,
                             seqlen_q, stride_qn, BLOCK_M, HEAD_DIM)
    do_desc = head_descriptor(GradOut, batch, stride_gb, head, stride_gh,
                              seqlen_q, stride_gn, BLOCK_M, HEAD_DIM)
    k_desc = head_descriptor(K, batch, stride_kb, head, stride_kh,
                             seqlen_k, stride_kn, BLOCK_N, HEAD_DIM)
    v_desc = head_descriptor(V, batch, stride_vb, head, stride_vh,
                             seqlen_k, stride_vn, BLOCK_N, HEAD_DIM)

    # Accumulators: keys along rows, each warpgroup holding 64 of them (warps along M).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    g_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=g_layout, k_width=2)
    # dQᵀ (head_dim × queries) of the fused form: head_dim along rows, so 64-row warpgroup tiles.
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, BLOCK_M, 16])

    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], kv_layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_layout)
    if ACCUMULATE_DQ:
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
        dq_desc = head_descriptor(GradQAcc, batch, stride_aqb, head, stride_aqh, seqlen_q,
                                  stride_aqn, BLOCK_M, HEAD_DIM)
        if IN_TURN:
            ds_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_N, BLOCK_M], ds_layout)
            dq_smem = gl.allocate_shared_memory(gl.float32, [1, BLOCK_M, HEAD_DIM],
                                                dq_desc.layout)
        else:
            ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], ds_layout)
            dq_smem = gl.allocate_shared_memory(gl.float32, [DQ_BUFFERS, BLOCK_M, HEAD_DIM],
                                                dq_desc.layout)
        dq_out = (ds_smem, dq_desc, dq_smem)
    else:
        dq_out = 0
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for stage in gl.static_range(STAGES):
        mbarrier.init(bars.index(stage), count=1)
    # The barriers' initialization visible to the copy engine before it signals them.
    fence_async_shared()

    # Query blocks that see this key block: all, or with the causal mask those from the one
    # holding query n0 on, of which those before full_start hold a query that misses some key.
    n_blocks = seqlen_q // BLOCK_M          # whole query blocks only (_hopper.gluon_dkdv_call)
    if UPPER:
        first = n0 // BLOCK_M
        full_start = gl.minimum(gl.cdiv(n0 + BLOCK_N - 1, BLOCK_M), n_blocks)
    else:
        first = 0
        full_start = 0
    n_items = n_blocks - first

    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [n0, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(v_desc, [n0, 0], kv_bar, v_smem)
    for index in gl.static_range(STAGES if IN_TURN else STAGES - 1):
        _load_query_block(q_desc, do_desc, q_smem, do_smem, bars, index, first + index, n_items,
                          BLOCK_M, STAGES)
    mbarrier.wait(kv_bar, 0)

    row_stats = batch64 * stride_lse_b + head64 * stride_lse_h
    lse_ptr = Lse + row_stats
    delta_ptr = Delta + row_stats
    if DROPOUT:
        # From the head's first row pair: each block adds its own (_elementwise_step).
        dropout = dropout_arguments(seed, counter_base, batch, heads_q, head, seqlen_q, 0,
                                    counters_per_row, drop_threshold, SEED_IN_MEMORY)
    else:
        dropout = 0

    if IN_TURN:
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, g_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, g_layout)
        s, dp = _issue_score_tiles(k_smem, v_smem, q_smem, do_smem, bars, 0, n_items, BLOCK_M,
                                   BLOCK_N, STAGES, s_layout)
        s, dp = warpgroup_mma_wait(num_outstanding=0, deps=(s, dp))
        if UPPER:   # the diagonal blocks, masked
            s, dp, dk, dv = _query_blocks_in_turn(
                k_smem, v_smem, q_desc, do_desc, q_smem, do_smem, bars, s, dp, dk, dv, lse_ptr,
                delta_ptr, first, first, full_start, n_items, n0, qk_scale, dropout, dq_out, dtype,
                BLOCK_M, BLOCK_N, STAGES, True, DROPOUT, N_ROUNDS, MASK_LAYOUT, HEAD_DIM,
                num_warps, s_layout, a_layout, dq_layout)
        s, dp, dk, dv = _query_blocks_in_turn(
            k_smem, v_smem, q_desc, do_desc, q_smem, do_smem, bars, s, dp, dk, dv, lse_ptr,
            delta_ptr, first, gl.maximum(full_start, first), n_blocks, n_items, n0, qk_scale,
            dropout, dq_out, dtype, BLOCK_M, BLOCK_N, STAGES, False, DROPOUT, N_ROUNDS,
            MASK_LAYOUT, HEAD_DIM, num_warps, s_layout, a_layout, dq_layout)
        tma.store_wait(0)          # shared memory is read before the program ends
    else:
        # The first query block's tiles (nothing accumulated yet); with the mask it is a diagonal one.
        mbarrier.wait(bars.index(0), 0)
        zeros = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
        s = warpgroup_mma(k_smem, q_smem.index(0).permute((1, 0)), zeros, use_acc=False,
                          is_async=True)
        dp = warpgroup_mma(v_smem, do_smem.index(0).permute((1, 0)), zeros, use_acc=False,
                           is_async=True)
        lse, delta = _row_statistics(lse_ptr, delta_ptr, first, BLOCK_M, s_layout)
        s, dp = warpgroup_mma_wait(num_outstanding=0, deps=(s, dp))
        p, ds = _elementwise_step(s, dp, lse, delta, first, n0, qk_scale, dropout, BLOCK_M, BLOCK_N,
                                  UPPER, DROPOUT, N_ROUNDS, MASK_LAYOUT, num_warps, s_layout)
        if ACCUMULATE_DQ:
            _stage_ds(ds, first, dq_out, dtype)
        dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, g_layout)
        dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, g_layout)

        if UPPER:   # the rest of the diagonal blocks, masked
            s, dp, p, ds, dk, dv = _query_blocks(
                k_smem, v_smem, q_desc, do_desc, q_smem, do_smem, bars, s, dp, p, ds, dk, dv, lse_ptr,
                delta_ptr, first, first + 1, full_start, n_items, n0, qk_scale, dropout, dq_out, dtype,
                BLOCK_M, BLOCK_N, STAGES, True, DROPOUT, N_ROUNDS, MASK_LAYOUT, ACCUMULATE_DQ,
                HEAD_DIM, num_warps, s_layout, a_layout, dq_layout)
        s, dp, p, ds, dk, dv = _query_blocks(
            k_smem, v_smem, q_desc, do_desc, q_smem, do_smem, bars, s, dp, p, ds, dk, dv, lse_ptr,
            delta_ptr, first, gl.maximum(full_start, first + 1), n_blocks, n_items, n0, qk_scale,
            dropout, dq_out, dtype, BLOCK_M, BLOCK_N, STAGES, False, DROPOUT, N_ROUNDS, MASK_LAYOUT,
            ACCUMULATE_DQ, HEAD_DIM, num_warps, s_layout, a_layout, dq_layout)

        stage = (n_items - 1) % STAGES
        dv = warpgroup_mma(gl.convert_layout(p.to(dtype), a_layout), do_smem.index(stage), dv,
                           is_async=True)
        dk = warpgroup_mma(gl.convert_layout(ds.to(dtype), a_layout), q_smem.index(stage), dk,
                           is_async=True)
        if ACCUMULATE_DQ:
            _before_barrier(ACCUMULATE_DQ)
            gl.thread_barrier()        # every warp's dSᵀ of the last block staged, and the dQ before it
            if n_blocks - 1 > first:
                _reduce_dq(n_blocks - 2, dq_out, BLOCK_M)
            dq = _issue_dq(k_smem, n_blocks - 1, dq_out, HEAD_DIM, BLOCK_M, dq_layout)
            dk, dv, dq = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv, dq))
            _stage_dq(dq, n_blocks - 1, dq_out)
            gl.thread_barrier()        # every warp's share of the last dQ staged
            _reduce_dq(n_blocks - 1, dq_out, BLOCK_M)
            tma.store_wait(0)          # shared memory is read before the program ends
        else:
            dk, dv = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dv))

    mbarrier.invalidate(kv_bar)
    for stage in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(stage))

    rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, g_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, g_layout))
    rows64 = rows.to(gl.int64)[:, None]
    if DROPOUT:     # kept entries are scaled by 1 / (1 - p), as in the portable pass
        dk = dk * (softmax_scale * drop_rescale)
        dv = dv * drop_rescale
    else:
        dk = dk * softmax_scale
    gl.store(GradK + batch64 * stride_dkb + head64 * stride_dkh + rows64 * stride_dkn
             + cols[None, :],
             dk.to(GradK.dtype.element_ty))
    gl.store(GradV + batch64 * stride_dvb + head64 * stride_dvh + rows64 * stride_dvn
             + cols[None, :],
             dv.to(GradV.dtype.element_ty))
