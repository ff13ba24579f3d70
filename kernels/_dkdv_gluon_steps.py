"""The per-query-block steps of the Gluon dK/dV pass (``_dkdv_gluon.py``), shared by its two
loops, and the loop of its fused form with 64-query blocks, which takes the blocks one after
another (``_query_blocks_in_turn``).

Why a second loop: the overlapped loop keeps the next block's Sᵀ and dPᵀ in registers beside
this block's Pᵀ, dSᵀ, dK and dV through the elementwise step. With 64-query blocks and the fifth
(dQ) product that no longer fits in 255 registers, so each block's elementwise step runs alone;
the next block's Sᵀ and dPᵀ are issued with this block's three products and overlap its dQ
write instead. What it buys: 64-query blocks halve the per-block fixed costs (barriers, fences,
the reduce's issue) that bounded the 32-query form (attention_notes v15). On the H200 it beats
the two-pass default at head dim 64 from 2K tokens on without a mask and from 4K causal, and
loses at 1K and at head dim 128, where it spills (v16, v17).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

from ._gluon_shared import load_block_pair, tma_reduce_add
from ._philox_gluon import keep_tile_transposed


@gluon.jit
def _load_query_block(q_desc, do_desc, q_smem, do_smem, bars, index, block, n_items,
                      BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """Start the TMA copies of query block ``block`` (the ``index``-th of this program's blocks, if
    it exists) into its stage; one barrier counts both copies."""
    load_block_pair(q_desc, do_desc, q_smem, do_smem, bars, index, block * BLOCK_M, n_items, STAGES)


@gluon.jit
def _row_statistics(lse_ptr, delta_ptr, block, BLOCK_M: gl.constexpr, s_layout: gl.constexpr):
    """lse and δ of query block ``block``, laid out along the columns of the transposed tiles."""
    cols = block * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    return gl.load(lse_ptr + cols), gl.load(delta_ptr + cols)


@gluon.jit
def _elementwise_step(s, dp, lse, delta, block, n0, qk_scale, dropout, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, CAUSAL_MASK: gl.constexpr, DROPOUT: gl.constexpr,
                      N_ROUNDS: gl.constexpr, MASK_LAYOUT: gl.constexpr, num_warps: gl.constexpr,
                      s_layout: gl.constexpr):
    """The Pᵀ that multiplies dO (dropped entries 0) and dSᵀ of query block ``block`` from its
    transposed score and dP tiles (keys along rows); with the mask, keys after a query get
    probability 0. ``dropout`` = (seed, counter base, the head's first row pair, counters per
    row, threshold): the block's keep-mask, applied as the portable pass applies it (dropped dP
    entries 0; the 1 / (1 - p) scale applied to dK and dV at the end)."""
    p = _probabilities(s, lse, block, n0, qk_scale, BLOCK_M, BLOCK_N, CAUSAL_MASK, s_layout)
    return _score_gradient(p, dp, delta, block, n0, dropout, BLOCK_M, BLOCK_N, DROPOUT, N_ROUNDS,
                           MASK_LAYOUT, num_warps, s_layout)


@gluon.jit
def _probabilities(s, lse, block, n0, qk_scale, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   CAUSAL_MASK: gl.constexpr, s_layout: gl.constexpr):
    """Pᵀ of query block ``block`` from its transposed score tile; with the mask, keys after a
    query get probability 0."""
    p = gl.exp2(s * qk_scale - lse[None, :])
    if CAUSAL_MASK:
        rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
        cols = block * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
        p = gl.where(rows[:, None] <= cols[None, :], p, 0.0)
    return p


@gluon.jit
def _score_gradient(p, dp, delta, block, n0, dropout, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, DROPOUT: gl.constexpr, N_ROUNDS: gl.constexpr,
                    MASK_LAYOUT: gl.constexpr, num_warps: gl.constexpr, s_layout: gl.constexpr):
    """(Pᵀ with dropped entries 0, dSᵀ) from Pᵀ and the transposed dP tile."""
    p_dropped = p
    if DROPOUT:
        seed, counter_base, first_pair, counters_per_row, threshold = dropout
        keep = keep_tile_transposed(seed, counter_base, first_pair + block * (BLOCK_M // 2),
                                    counters_per_row, n0, threshold, BLOCK_M, BLOCK_N, N_ROUNDS,
                                    MASK_LAYOUT, num_warps, s_layout)
        p_dropped = gl.where(keep, p, 0.0)
        dp = gl.where(keep, dp, 0.0)
    return p_dropped, p * (dp - delta[None, :])


@gluon.jit
def _issue_score_tiles(k_smem, v_smem, q_smem, do_smem, bars, index, n_items,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                       s_layout: gl.constexpr):
    """Start Sᵀ and dPᵀ of this program's ``index``-th query block, once its copies have landed.
    Past the last block (``index == n_items``) nothing was loaded: the products read a stage no
    copy is writing, and their results are discarded."""
    stage = index % STAGES
    mbarrier.wait(bars.index(stage), (index // STAGES) & 1, pred=index < n_items)
    zeros = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
    s = warpgroup_mma(k_smem, q_smem.index(stage).permute((1, 0)), zeros, use_acc=False,
                      is_async=True)
    dp = warpgroup_mma(v_smem, do_smem.index(stage).permute((1, 0)), zeros, use_acc=False,
                       is_async=True)
    return s, dp


@gluon.jit
def _query_blocks_in_turn(k_smem, v_smem, q_desc, do_desc, q_smem, do_smem, bars, s, dp, dk, dv,
                          lse_ptr, delta_ptr, first, begin, end, n_items, n0, qk_scale, dropout,
                          dq_out, dtype: gl.constexpr, BLOCK_M: gl.constexpr,
                          BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL_MASK: gl.constexpr,
                          DROPOUT: gl.constexpr, N_ROUNDS: gl.constexpr,
                          MASK_LAYOUT: gl.constexpr, HEAD_DIM: gl.constexpr,
                          num_warps: gl.constexpr, s_layout: gl.constexpr,
                          a_layout: gl.constexpr, dq_layout: gl.constexpr):
    """The fused pass's query blocks ``begin`` .. ``end`` - 1 one after another, for 64-query
    tiles, whose accumulators leave no registers for a second block's elementwise step: each
    block's three products (dV, dK, dQᵀ) are issued together with the next block's Sᵀ and dPᵀ,
    which run while this block's dQ is staged and its reduce issued. On entry ``s`` and ``dp``
    are block begin's tiles (waited for); on exit block end's (past the last block, garbage).
    ``dq_out`` = (dSᵀ buffer, the float32 dQ sum's descriptor, the dQ staging buffer), one of
    each. On entry the stages hold the next STAGES blocks (or their copies are in flight)."""
    ds_smem = dq_out[0].index(0)
    dq_smem = dq_out[2].index(0)
    for block in range(begin, end):
        index = block - first
        stage = index % STAGES
        cols = block * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
        # lse is dead before δ is loaded (per-query statistics take 16 registers each in this
        # layout).
        lse = gl.load(lse_ptr + cols)
        p = _probabilities(s, lse, block, n0, qk_scale, BLOCK_M, BLOCK_N, CAUSAL_MASK, s_layout)
        delta = gl.load(delta_ptr + cols)
        p, ds = _score_gradient(p, dp, delta, block, n0, dropout, BLOCK_M, BLOCK_N, DROPOUT,
                                N_ROUNDS, MASK_LAYOUT, num_warps, s_layout)
        ds_smem.store(ds.to(dtype))
        fence_async_shared()
        # Before the barrier: the previous block's reduce has finished reading the dQ buffer (its
        # issuing threads wait here, everyone else at the barrier). After it: every warp's dSᵀ
        # is staged for the dQᵀ product.
        tma.store_wait(0)
        gl.thread_barrier()
        dv = warpgroup_mma(gl.convert_layout(p.to(dtype), a_layout), do_smem.index(stage), dv,
                           is_async=True)
        dk = warpgroup_mma(gl.convert_layout(ds.to(dtype), a_layout), q_smem.index(stage), dk,
                           is_async=True)
        dq = warpgroup_mma(k_smem.permute((1, 0)), ds_smem,
                           gl.zeros([HEAD_DIM, BLOCK_M], gl.float32, dq_layout), use_acc=False,
                           is_async=True)
        s, dp = _issue_score_tiles(k_smem, v_smem, q_smem, do_smem, bars, index + 1, n_items,
                                   BLOCK_M, BLOCK_N, STAGES, s_layout)
        # Products complete in issue order: two outstanding means dQᵀ, dK and dV are done.
        dq, dk, dv = warpgroup_mma_wait(num_outstanding=2, deps=(dq, dk, dv))
        dq_smem.permute((1, 0)).store(dq)
        fence_async_shared()
        # Every warp's products of this block are done (its stage and the dSᵀ buffer are free)
        # and its share of dQ staged.
        gl.thread_barrier()
        tma_reduce_add(dq_out[1], [block * BLOCK_M, 0], dq_smem)
        _load_query_block(q_desc, do_desc, q_smem, do_smem, bars, index + STAGES,
                          block + STAGES, n_items, BLOCK_M, STAGES)
        # Waited for here, not at the top of the next iteration: tiles still in flight across the
        # loop's back edge make ptxas serialize every warpgroup MMA of the kernel (its C7514
        # "non wgmma instructions reading accumulator registers"), which the compile tests check.
        s, dp = warpgroup_mma_wait(num_outstanding=0, deps=(s, dp))
    return s, dp, dk, dv
