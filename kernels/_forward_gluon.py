"""Forward pass for Hopper (sm_90) written in Gluon: TMA loads into a ring of shared-memory stages
and asynchronous warpgroup MMAs, with the next score tile's product in flight while the softmax of
the current one runs (FlashAttention-3's intra-warpgroup overlap).

Why a Gluon kernel: Triton 3.6's compiler waits on every product at once in the portable forward
(one key block's softmax never overlaps the next block's Q·Kᵀ), and its automatic warp
specialization gave wrong results on sm_90 (docs/results/attention_notes.md, v7). Here the
schedule is written out:

    S_0 = Q·K_0ᵀ; P_0 = softmax step
    for j: issue S_{j+1} = Q·K_{j+1}ᵀ, issue O += P_j·V_j, wait for S_{j+1} only,
           softmax step on S_{j+1} (while P_j·V_j runs), wait for O, rescale O
    O += P_last·V_last

(Compiled for sm_90 by Triton 3.6, ptxas moves the wait for O ahead of nearly all of the step's
exponentials, so P_j·V_j overlaps little of the softmax step: ``scripts/kernel_resources.py``'s
``exps_under_mma``, attention_notes v41.)

K and V arrive by TMA into KV_STAGES stages, each with its own mbarrier, loaded KV_STAGES - 1
blocks ahead. With a causal mask the key blocks every row of the query block sees run that loop
unmasked and the diagonal blocks run it again with the mask; blocks past the diagonal are not
touched. With dropout each block's keep-mask is regenerated in the score tile's own layout
(``_philox_gluon.keep_tile``), the row sums take the undropped probabilities and P·V the kept
ones, and 1 / (1 - p) is applied once at the end, as in the portable kernel. The same arguments
as ``_forward._forward_kernel`` (launch plans pass them), for the calls
``_hopper.gluon_supported`` lets through: padded input, no window, whole key blocks, head_dim 64
or 128, fp16/bf16, and for causal calls as many queries as keys. The default only where it was
measured fastest (``_tile_rules.gluon_forward_tiles``: without dropout, causal at head dim 128; with
dropout, head dim 128, and 64 without a mask); the
interpreter cannot run Gluon, so the tests that exercise it are GPU-marked.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

from ._gluon_shared import head_descriptor
from ._philox_gluon import dropout_arguments, dropped


@gluon.jit
def _load_key_block(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, block, n_blocks,
                    BLOCK_N: gl.constexpr, KV_STAGES: gl.constexpr):
    """Start the TMA copies of key block ``block`` (if it exists) into its stage."""
    stage = block % KV_STAGES
    exists = block < n_blocks
    mbarrier.expect(k_bars.index(stage), k_desc.block_type.nbytes, pred=exists)
    tma.async_copy_global_to_shared(k_desc, [block * BLOCK_N, 0], k_bars.index(stage),
                                    k_smem.index(stage), pred=exists)
    mbarrier.expect(v_bars.index(stage), v_desc.block_type.nbytes, pred=exists)
    tma.async_copy_global_to_shared(v_desc, [block * BLOCK_N, 0], v_bars.index(stage),
                                    v_smem.index(stage), pred=exists)


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale):
    """One online-softmax step on a score tile: new row maxima, probabilities (unnormalized),
    the factor that rescales what was accumulated so far, and the updated row sums."""
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return p, m_new, l_i * alpha + gl.sum(p, 1), alpha


@gluon.jit
def _causal_scores(s, block, m0, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   s_layout: gl.constexpr):
    """Scores of key block ``block`` with the keys after each query set to -inf (as many queries
    as keys, so query i sees keys 0..i)."""
    rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    cols = block * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    return gl.where(cols[None, :] <= rows[:, None], s, float("-inf"))


@gluon.jit
def _key_blocks(q_smem, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, s, p, m_i, l_i, acc,
                first, end, n_loaded, m0, qk_scale, dropout, dtype: gl.constexpr,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, KV_STAGES: gl.constexpr,
                CAUSAL_MASK: gl.constexpr, DROPOUT: gl.constexpr, N_ROUNDS: gl.constexpr,
                s_layout: gl.constexpr, o_rows: gl.constexpr, p_layout: gl.constexpr):
    """Key blocks ``first`` .. ``end`` - 1, overlapped: on entry ``p`` holds block first - 1's
    probabilities (not yet multiplied by V); on exit block end - 1's."""
    for following in range(first, end):
        current = following - 1
        # Every warpgroup has finished block current - 1's products (waited at the end of the last
        # iteration) before its stage is refilled with block current - 1 + KV_STAGES.
        gl.thread_barrier()
        _load_key_block(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, current + KV_STAGES - 1,
                        n_loaded, BLOCK_N, KV_STAGES)
        stage = following % KV_STAGES
        mbarrier.wait(k_bars.index(stage), (following // KV_STAGES) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)), s, use_acc=False,
                          is_async=True)
        stage = current % KV_STAGES
        mbarrier.wait(v_bars.index(stage), (current // KV_STAGES) & 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(stage), acc,
                            is_async=True)
        # Products complete in issue order: at most one outstanding means S_following is done
        # while P_current·V_current may still run under the softmax step.
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
        if CAUSAL_MASK:
            s = _causal_scores(s, following, m0, BLOCK_M, BLOCK_N, s_layout)
        p, m_i, l_i, alpha = _softmax_step(s, m_i, l_i, qk_scale)
        if DROPOUT:
            p = dropped(p, following, dropout, BLOCK_M, BLOCK_N, N_ROUNDS, s_layout)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
    return s, p, m_i, l_i, acc


# The signature of _forward._forward_kernel (launch plans pass the same arguments), plus
# KV_STAGES and num_warps.
@gluon.jit(do_not_specialize=["seed", "counter_base"])
def _forward_gluon_kernel(
    Q, K, V, Out, Lse, cu_seqlens, seed, counter_base,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_lse_b, stride_lse_h,
    seqlen_q, seqlen_k, heads_q, group_size, window_left, window_right,
    qk_scale, counters_per_row, drop_threshold, drop_rescale,
    HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    UPPER: gl.constexpr, LOWER: gl.constexpr, DROPOUT: gl.constexpr, VARLEN: gl.constexpr,
    PRECISION: gl.constexpr, N_ROUNDS: gl.constexpr, KV_STAGES: gl.constexpr,
    num_warps: gl.constexpr, SEED_IN_MEMORY: gl.constexpr = False,
):
    # UPPER is the causal mask here (no window: _hopper.gluon_call), with as many queries as keys.
    gl.static_assert(not (LOWER or VARLEN), "windows and packed input run the portable kernel")
    # The keep-mask's counters cover 16-row pairs and 32-column blocks (_philox.py).
    gl.static_assert(not DROPOUT or (BLOCK_M % 16 == 0 and BLOCK_N % 32 == 0),
                     "dropout needs query blocks of 16 rows and key blocks of 32 columns")
    gl.static_assert(HEAD_DIM == BLOCK_D, "head_dim must be a power of two (64 or 128)")
    gl.static_assert(KV_STAGES >= 2, "the next key block must be in flight")
    dtype: gl.constexpr = Q.dtype.element_ty

    # Reverse order: with the causal mask the last query blocks do the most work; start them first.
    block_m = gl.num_programs(0) - 1 - gl.program_id(0)
    head = gl.program_id(1)
    batch = gl.program_id(2)
    head_k = head // group_size
    m0 = block_m * BLOCK_M
    batch64 = batch.to(gl.int64)

    # One descriptor per (sequence, head): rows past the sequence's end arrive as zeros.
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_desc = head_descriptor(Q, batch, stride_qb, head, stride_qh,
                             seqlen_q, stride_qn, BLOCK_M, HEAD_DIM)
    k_desc = head_descriptor(K, batch, stride_kb, head_k, stride_kh,
                             seqlen_k, stride_kn, BLOCK_N, HEAD_DIM)
    v_desc = head_descriptor(V, batch, stride_vb, head_k, stride_vh,
                             seqlen_k, stride_vn, BLOCK_N, HEAD_DIM)

    # Accumulators of the two products: each warpgroup holds 64 query rows (warps along M).
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    o_cols: gl.constexpr = gl.SliceLayout(0, o_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [KV_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [KV_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [KV_STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [KV_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for stage in gl.static_range(KV_STAGES):
        mbarrier.init(k_bars.index(stage), count=1)
        mbarrier.init(v_bars.index(stage), count=1)
    # The barriers' initialization visible to the copy engine before it signals them.
    fence_async_shared()

    # Key blocks this query block sees: all of them, or with the causal mask those up to its
    # diagonal, of which the first n_full are seen whole by every row.
    n_blocks = seqlen_k // BLOCK_N          # whole key blocks only (_hopper.gluon_call)
    if UPPER:
        n_end = gl.minimum(n_blocks, gl.cdiv(m0 + BLOCK_M, BLOCK_N))
        n_full = gl.maximum(gl.minimum((m0 + 1) // BLOCK_N, n_end), 1)
    else:
        n_end = n_blocks
        n_full = n_blocks
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [m0, 0], q_bar, q_smem)
    for block in gl.static_range(KV_STAGES - 1):
        _load_key_block(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, block, n_end,
                        BLOCK_N, KV_STAGES)
    mbarrier.wait(q_bar, 0)

    # The first score tile and its softmax step (nothing accumulated yet). Query i sees key 0,
    # so every row's maximum is finite from here on.
    mbarrier.wait(k_bars.index(0), 0)
    s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)),
                      gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                      is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    if UPPER:
        s = _causal_scores(s, 0, m0, BLOCK_M, BLOCK_N, s_layout)
    m_i = gl.max(s, 1) * qk_scale
    p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, 1)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    if DROPOUT:
        dropout = dropout_arguments(seed, counter_base, batch, heads_q, head, seqlen_q, m0,
                                    counters_per_row, drop_threshold, SEED_IN_MEMORY)
        p = dropped(p, 0, dropout, BLOCK_M, BLOCK_N, N_ROUNDS, s_layout)
    else:
        dropout = 0

    s, p, m_i, l_i, acc = _key_blocks(q_smem, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, s, p,
                                      m_i, l_i, acc, 1, n_full, n_end, m0, qk_scale, dropout, dtype,
                                      BLOCK_M, BLOCK_N, KV_STAGES, False, DROPOUT, N_ROUNDS,
                                      s_layout, o_rows, p_layout)
    if UPPER:   # the diagonal blocks, masked
        s, p, m_i, l_i, acc = _key_blocks(q_smem, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, s,
                                          p, m_i, l_i, acc, n_full, n_end, n_end, m0, qk_scale,
                                          dropout, dtype, BLOCK_M, BLOCK_N, KV_STAGES, True,
                                          DROPOUT, N_ROUNDS, s_layout, o_rows, p_layout)

    last = n_end - 1
    mbarrier.wait(v_bars.index(last % KV_STAGES), (last // KV_STAGES) & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(last % KV_STAGES),
                        acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

    mbarrier.invalidate(q_bar)
    for stage in gl.static_range(KV_STAGES):
        mbarrier.invalidate(k_bars.index(stage))
        mbarrier.invalidate(v_bars.index(stage))

    # Every row saw at least key 0, so l_i > 0. With dropout the kept weights entered unscaled.
    if DROPOUT:
        acc = acc * (drop_rescale / gl.convert_layout(l_i, o_rows))[:, None]
    else:
        acc = acc / gl.convert_layout(l_i, o_rows)[:, None]
    rows = m0 + gl.arange(0, BLOCK_M, layout=o_rows)
    cols = gl.arange(0, HEAD_DIM, layout=o_cols)
    o_base = Out + batch64 * stride_ob + head.to(gl.int64) * stride_oh
    gl.store(o_base + rows.to(gl.int64)[:, None] * stride_on + cols[None, :],
             acc.to(Out.dtype.element_ty), mask=(rows < seqlen_q)[:, None])
    lse_rows = m0 + gl.arange(0, BLOCK_M, layout=s_rows)
    gl.store(Lse + batch64 * stride_lse_b + head.to(gl.int64) * stride_lse_h + lse_rows,
             m_i + gl.log2(l_i), mask=lse_rows < seqlen_q)
