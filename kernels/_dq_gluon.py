"""dQ pass for Hopper (sm_90) written in Gluon: the next key block's two products in flight while the
current block's dQ product runs, with K and V arriving by TMA.

The portable dQ pass (``_backward_kernels._dq_kernel``) waits on each of its three products as it issues
it. Per query block (Q and dO held in shared memory, loaded once; δ = rowsum(dO∘O) computed and
stored first, for the dK/dV pass), for key blocks j:

    S_j = Q·K_jᵀ, dP_j = dO·V_jᵀ        (issued asynchronously, then waited for)
    P_j = exp2(S_j·scale − lse), dS_j = P_j∘(dP_j − δ)
    dQ += dS_j·K_j

and the loop issues S_{j+1} and dP_{j+1} before dQ += dS_j·K_j, waits for the first two only,
computes block j+1's elementwise step while block j's product runs, then waits for it before its
stage of K/V is reused. K and V arrive by TMA into STAGES stages (one mbarrier each, refilled at
the top of the iteration after the one that used them, so STAGES >= 3). With the causal mask the
key blocks every row sees run that loop unmasked and the diagonal blocks run it masked.

With dropout each block's keep-mask is regenerated in the score tile's own layout
(``_philox_gluon.keep_tile``: each thread runs Philox only for the counters it holds), dropped
entries of dP are 0, δ is stored and used as δ·(1 − p), and dQ is scaled by 1 / (1 − p) at the
end, as in the portable pass.

The same arguments as ``_backward_kernels._dq_kernel`` (launch plans pass them), for the calls
``_hopper.gluon_dq_call`` lets through: padded input, fp16/bf16, head_dim 64 or 128, no window,
whole query and key blocks, and with the causal mask as many queries as keys.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

from ._gluon_shared import head_descriptor, load_block_pair
from ._philox_gluon import dropout_arguments, keep_tile


@gluon.jit
def _load_key_block(k_desc, v_desc, k_smem, v_smem, bars, block, n_blocks,
                    BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """Start the TMA copies of key block ``block`` (if it exists) into its stage; one barrier
    counts both copies."""
    load_block_pair(k_desc, v_desc, k_smem, v_smem, bars, block, block * BLOCK_N, n_blocks, STAGES)


@gluon.jit
def _elementwise_step(s, dp, lse, delta, block, m0, qk_scale, dropout, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, CAUSAL_MASK: gl.constexpr, DROPOUT: gl.constexpr,
                      N_ROUNDS: gl.constexpr, s_layout: gl.constexpr):
    """dS of key block ``block``; with the mask, keys after a query get probability 0; with
    ``dropout`` = (seed, counter base, this block's first row pair, counters per row,
    threshold), dropped entries of dP are 0."""
    p = gl.exp2(s * qk_scale - lse[:, None])
    if CAUSAL_MASK:
        rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        cols = block * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        p = gl.where(cols[None, :] <= rows[:, None], p, 0.0)
    if DROPOUT:
        seed, counter_base, first_pair, counters_per_row, threshold = dropout
        keep = keep_tile(seed, counter_base, first_pair, counters_per_row, block * BLOCK_N,
                         threshold, BLOCK_M, BLOCK_N, N_ROUNDS, s_layout)
        dp = gl.where(keep, dp, 0.0)
    return p * (dp - delta[:, None])


@gluon.jit
def _key_blocks(q_smem, do_smem, k_desc, v_desc, k_smem, v_smem, bars, s, dp, ds, dq, lse, delta,
                begin, end, n_blocks, m0, qk_scale, dropout, dtype: gl.constexpr,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                CAUSAL_MASK: gl.constexpr, DROPOUT: gl.constexpr, N_ROUNDS: gl.constexpr,
                s_layout: gl.constexpr, a_layout: gl.constexpr):
    """Key blocks ``begin`` .. ``end`` - 1, overlapped: on entry ``ds`` holds block begin - 1's
    tile (not yet multiplied into dQ); on exit block end - 1's."""
    for following in range(begin, end):
        current = following - 1
        # Every warpgroup has finished block current - 1's product (waited at the end of the last
        # iteration) before its stage is refilled with block current - 1 + STAGES.
        gl.thread_barrier()
        _load_key_block(k_desc, v_desc, k_smem, v_smem, bars, current + STAGES - 1, n_blocks,
                        BLOCK_N, STAGES)
        stage = following % STAGES
        mbarrier.wait(bars.index(stage), (following // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s, use_acc=False,
                          is_async=True)
        dp = warpgroup_mma(do_smem, v_smem.index(stage).permute((1, 0)), dp, use_acc=False,
                           is_async=True)
        dq = warpgroup_mma(gl.convert_layout(ds.to(dtype), a_layout),
                           k_smem.index(current % STAGES), dq, is_async=True)
        # Products complete in issue order: one outstanding means S and dP of the following block
        # are done while dQ's product for the current one may still run under the elementwise step.
        s, dp = warpgroup_mma_wait(num_outstanding=1, deps=(s, dp))
        ds = _elementwise_step(s, dp, lse, delta, following, m0, qk_scale, dropout, BLOCK_M,
                               BLOCK_N, CAUSAL_MASK, DROPOUT, N_ROUNDS, s_layout)
        dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ))
    return s, dp, ds, dq


# The signature of _backward_kernels._dq_kernel (launch plans pass the same arguments), plus STAGES and
# num_warps.
@gluon.jit(do_not_specialize=["seed", "counter_base"])
def _dq_gluon_kernel(
    Q, K, V, GradOut, Out, Lse, Delta, GradQ, cu_seqlens, seed, counter_base,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_gb, stride_gn, stride_gh,
    stride_ob, stride_on, stride_oh,
    stride_dqb, stride_dqn, stride_dqh, stride_lse_b, stride_lse_h,
    seqlen_q, seqlen_k, heads_q, group_size, window_left, window_right,
    softmax_scale, qk_scale, counters_per_row, drop_threshold, drop_rescale,
    HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    UPPER: gl.constexpr, LOWER: gl.constexpr, DROPOUT: gl.constexpr, VARLEN: gl.constexpr,
    PRECISION: gl.constexpr, N_ROUNDS: gl.constexpr, STAGES: gl.constexpr,
    num_warps: gl.constexpr, SEED_IN_MEMORY: gl.constexpr = False,
):
    # UPPER is the causal mask here (no window: _hopper.gluon_dq_call), with as many queries as keys.
    gl.static_assert(not (LOWER or VARLEN), "windows and packed input run the portable kernel")
    # The keep-mask's counters cover 16-row pairs and 32-column blocks (_philox.py).
    gl.static_assert(not DROPOUT or (BLOCK_M % 16 == 0 and BLOCK_N % 32 == 0),
                     "dropout needs query blocks of 16 rows and key blocks of 32 columns")
    gl.static_assert(HEAD_DIM == BLOCK_D, "head_dim must be a power of two (64 or 128)")
    # A block's stage is refilled at the top of the iteration after its product: with 2 stages
    # the refill would be the very block that iteration waits for, so nothing is loaded ahead.
    gl.static_assert(STAGES >= 3, "the next key block must be in flight: 3 stages or more")
    dtype: gl.constexpr = Q.dtype.element_ty

    # Reverse order: with the causal mask the last query blocks do the most work; start them first.
    block_m = gl.num_programs(0) - 1 - gl.program_id(0)
    head = gl.program_id(1)
    batch = gl.program_id(2)
    head_k = head // group_size
    m0 = block_m * BLOCK_M
    batch64 = batch.to(gl.int64)
    head64 = head.to(gl.int64)

    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_desc = head_descriptor(Q, batch, stride_qb, head, stride_qh,
                             seqlen_q, stride_qn, BLOCK_M, HEAD_DIM)
    do_desc = head_descriptor(GradOut, batch, stride_gb, head, stride_gh,
                              seqlen_q, stride_gn, BLOCK_M, HEAD_DIM)
    k_desc = head_descriptor(K, batch, stride_kb, head_k, stride_kh,
                             seqlen_k, stride_kn, BLOCK_N, HEAD_DIM)
    v_desc = head_descriptor(V, batch, stride_vb, head_k, stride_vh,
                             seqlen_k, stride_vn, BLOCK_N, HEAD_DIM)

    # Accumulators: queries along rows, each warpgroup holding 64 of them (warps along M).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    g_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=g_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout)
    do_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for stage in gl.static_range(STAGES):
        mbarrier.init(bars.index(stage), count=1)
    # The barriers' initialization visible to the copy engine before it signals them.
    fence_async_shared()

    # Key blocks this query block sees: all of them, or with the causal mask those up to its
    # diagonal, of which the first n_full are seen whole by every row.
    n_blocks = seqlen_k // BLOCK_N          # whole key blocks only (_hopper.gluon_dq_call)
    if UPPER:
        n_end = gl.minimum(n_blocks, gl.cdiv(m0 + BLOCK_M, BLOCK_N))
        n_full = gl.maximum(gl.minimum((m0 + 1) // BLOCK_N, n_end), 1)
    else:
        n_end = n_blocks
        n_full = n_blocks
    mbarrier.expect(q_bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [m0, 0], q_bar, q_smem)
    tma.async_copy_global_to_shared(do_desc, [m0, 0], q_bar, do_smem)
    for block in gl.static_range(STAGES - 1):
        _load_key_block(k_desc, v_desc, k_smem, v_smem, bars, block, n_end, BLOCK_N, STAGES)

    # δ = rowsum(dO∘O), stored for the dK/dV pass (launched after this one): O read with coalesced
    # loads while the copies run, dO from its shared-memory copy.
    rows_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    o_rows = (m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, rows_layout))).to(gl.int64)
    o_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, rows_layout))
    o = gl.load(Out + batch64 * stride_ob + head64 * stride_oh + o_rows[:, None] * stride_on
                + o_cols[None, :])
    row_stats = batch64 * stride_lse_b + head64 * stride_lse_h + m0
    stat_rows = gl.arange(0, BLOCK_M, layout=s_rows)
    lse = gl.load(Lse + row_stats + stat_rows)
    mbarrier.wait(q_bar, 0)
    do = do_smem.load(rows_layout)
    delta = gl.convert_layout(gl.sum(o.to(gl.float32) * do.to(gl.float32), 1), s_rows)
    if DROPOUT:
        # Stored and used as δ·(1 − p), as the portable pass does (_backward_kernels.py).
        delta = delta / drop_rescale
        dropout = dropout_arguments(seed, counter_base, batch, heads_q, head, seqlen_q, m0,
                                    counters_per_row, drop_threshold, SEED_IN_MEMORY)
    else:
        dropout = 0
    gl.store(Delta + row_stats + stat_rows, delta)

    # The first key block's tiles (nothing accumulated yet).
    mbarrier.wait(bars.index(0), 0)
    zeros = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zeros, use_acc=False, is_async=True)
    dp = warpgroup_mma(do_smem, v_smem.index(0).permute((1, 0)), zeros, use_acc=False,
                       is_async=True)
    s, dp = warpgroup_mma_wait(num_outstanding=0, deps=(s, dp))
    ds = _elementwise_step(s, dp, lse, delta, 0, m0, qk_scale, dropout, BLOCK_M, BLOCK_N, UPPER,
                           DROPOUT, N_ROUNDS, s_layout)
    dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, g_layout)

    s, dp, ds, dq = _key_blocks(q_smem, do_smem, k_desc, v_desc, k_smem, v_smem, bars, s, dp, ds,
                                dq, lse, delta, 1, n_full, n_end, m0, qk_scale, dropout, dtype,
                                BLOCK_M, BLOCK_N, STAGES, False, DROPOUT, N_ROUNDS, s_layout,
                                a_layout)
    if UPPER:   # the diagonal blocks, masked
        s, dp, ds, dq = _key_blocks(q_smem, do_smem, k_desc, v_desc, k_smem, v_smem, bars, s, dp,
                                    ds, dq, lse, delta, n_full, n_end, n_end, m0,
                                    qk_scale, dropout, dtype, BLOCK_M, BLOCK_N, STAGES, True,
                                    DROPOUT, N_ROUNDS, s_layout, a_layout)

    last = n_end - 1
    dq = warpgroup_mma(gl.convert_layout(ds.to(dtype), a_layout), k_smem.index(last % STAGES), dq,
                       is_async=True)
    dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ))

    mbarrier.invalidate(q_bar)
    for stage in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(stage))

    if DROPOUT:     # kept entries are scaled by 1 / (1 - p), as in the portable pass
        scale = softmax_scale * drop_rescale
    else:
        scale = softmax_scale
    rows = (m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, g_layout))).to(gl.int64)
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, g_layout))
    gl.store(GradQ + batch64 * stride_dqb + head64 * stride_dqh + rows[:, None] * stride_dqn
             + cols[None, :], (dq * scale).to(GradQ.dtype.element_ty))
