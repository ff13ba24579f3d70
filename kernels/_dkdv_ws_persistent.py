"""The warp-specialized fused dK/dV/dQ pass (``_dkdv_warp_specialized.py``) in a persistent grid:
one program per SM walks the (key block, head, batch) tiles, key block fastest, striding by the
grid size (with the causal mask every other round backwards: ``_tile``).

Why: at 1K-2K tokens a 128-key program has only 16-32 query blocks to stream, and its fixed costs
(barrier setup, descriptors, the first K/V and Q/dO loads, the dK/dV stores) are a large share of
its time: the non-persistent pass ran the whole d128 backward 1.30x slower than cuDNN's at 1K
against 1.05x at 16K (profile, attention_notes v22). Here the barrier phases continue from tile to
tile, the descriptors are made once per program, and the producer loads a tile's first Q and dO
as soon as a stage frees (during the previous tile), then its K and V once both consumers are
done with the previous tile's, so the previous tile's dK/dV stores overlap those loads.

Measured on an H200 (bf16, hidden 2048, whole backward, three rounds in one process;
attention_notes v22) against the non-persistent pass without a mask: head dim 128 +8.5 / +6.2 /
+2.0 / -0.7 % at 1K / 2K / 4K / 16K, head dim 64 +16.5 / +10.6 / +5.2 / -1.0 %. Causal it lost
(0.89-0.96 at d128 1K-4K, 0.69 at 16K) while its programs strode over key blocks of unequal work
in one direction; with every other round reversed (v28) it is the causal default at head dim 64
from 1K to 16K tokens (16K: v30) and at 128 from 1K to 2K. Since v32 also from 512 tokens, and
with dropout at 512-4K (head dim 64) and 512-1K (128) without a mask, and causal at 1K-2K (head
dim 64) and 2K (128, since v34) (_tile_rules.WARP_SPECIALIZED_PERSISTENT_SEQLEN).
It computes the causal mask exactly for tiles that ask for it.

K/V buffers (KV_BUFFERS, 1 or 2): with one, the producer waits for both consumers to finish a
tile before it loads the next tile's K and V, so that load's latency is exposed at every tile.
With two, tiles take the buffers in turn and the next tile's K and V load while this tile runs.
Two fit shared memory at head dim 64 only (164 -> 197 KB). Whole backward, d64 without a mask,
against one buffer (H200, attention_notes v23): +3.3 / +2.8 / +2.8 / +1.8 % at 1K / 2K / 4K /
8K; causal +1.6 / +0.1 % at 1K / 4K. With dropout one buffer was faster (v32): the rule gives
two without dropout only.

Descriptors: one 2-D descriptor per tensor over (batch x seqlen) rows and (heads x head_dim)
columns, so q, k, v and the output gradient must be rows of one matrix
(``_hopper.rows_of_one_matrix``); the float32 dQ sum is contiguous. The same arguments as
``_dkdv_warp_specialized._dkdv_warp_specialized_kernel``, then the batch size. MASK_PARTITION
as there: the keep-masks from warps of their own.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from ._dkdv_warp_specialized import _query_blocks
from ._dkdv_ws_setup import ROWS, check_tiles, store_key_gradients, tiles_and_barriers
from ._dropout_mask_partition import mask_buffers, write_block_masks
from ._gluon_shared import alternate_rounds
from ._philox_gluon import dropout_arguments


@gluon.jit
def _tile(tile, n_tiles, n_kblocks, heads, CAUSAL: gl.constexpr):
    """(first key n0, head, batch, first query block) of a tile: key block fastest, so the
    programs running at once share a few heads' Q and dO in L2. The first query block is the
    first with a query that sees one of the keys from n0 on.

    With the causal mask a key block's work falls with its index, so striding by the grid size
    would give some programs the heavy blocks of every head and others the light ones. Every
    other round of the grid (a whole one) runs backwards: a program that took a heavy tile in one
    round takes a light one in the next, exactly its complement where the grid is a multiple of
    the key blocks per head (``_backward.persistent_programs``). (Whole backward against striding
    alone, two processes, on all 132 SMs, attention_notes v28: -18 / -12 / -6.5 / -4.5 % at head
    dim 64 and 1K / 2K / 4K / 8K tokens, -20 / -12 / -4 % at 128 and 1K / 2K / 4K.)"""
    if CAUSAL:
        tile = alternate_rounds(tile, n_tiles)
    pair = tile // n_kblocks
    n0 = (tile % n_kblocks) * (2 * ROWS)
    if CAUSAL:
        first = n0 // ROWS
    else:
        first = 0
    return n0, pair % heads, pair // heads, first


@gluon.jit
def _load_qdo(q_desc, do_desc, q_smem, do_smem, qdo_full, qdo_empty, loaded, row, col,
              STAGES: gl.constexpr):
    """Q and dO of the program's ``loaded``-th query block into its stage, once both consumers
    released it (a fresh barrier counts as having completed phase 1: the first pass waits for
    nothing)."""
    stage = loaded % STAGES
    mbarrier.wait(qdo_empty.index(stage), ((loaded // STAGES) & 1) ^ 1)
    mbarrier.expect(qdo_full.index(stage), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [row, col], qdo_full.index(stage), q_smem.index(stage))
    tma.async_copy_global_to_shared(do_desc, [row, col], qdo_full.index(stage), do_smem.index(stage))


@gluon.jit
def _producer(descs, buffers, bars, geometry, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
              HEAD_DIM: gl.constexpr, KV_BUFFERS: gl.constexpr):
    """One warp: per tile, its first Q/dO block, then K and V into the tile's K/V buffer (tiles
    take the KV_BUFFERS buffers in turn), then the rest of its Q/dO blocks."""
    q_desc, do_desc, k_desc, v_desc, dq_desc = descs
    q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, p_smem = buffers
    kv_full, kv_empty, qdo_full, qdo_empty, ds_full, ds_empty = bars
    n_tiles, n_kblocks, heads, seqlen_q, seqlen_k = geometry
    n_blocks = seqlen_q // ROWS
    loaded = 0
    done = 0
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        n0, head, batch, first = _tile(tile, n_tiles, n_kblocks, heads, CAUSAL)
        q_row0 = batch * seqlen_q
        col = head * HEAD_DIM
        # The first Q/dO block as soon as a stage is free: during the previous tile's last blocks.
        _load_qdo(q_desc, do_desc, q_smem, do_smem, qdo_full, qdo_empty, loaded,
                  q_row0 + first * ROWS, col, STAGES)
        # K and V once both consumers have waited for every product reading the buffer's
        # previous tile (with two buffers, the tile before the previous one).
        buffer = done % KV_BUFFERS
        full = kv_full.index(buffer)
        mbarrier.wait(kv_empty.index(buffer), ((done // KV_BUFFERS) & 1) ^ 1)
        mbarrier.expect(full, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [batch * seqlen_k + n0, col], full,
                                        k_smem.index(buffer))
        tma.async_copy_global_to_shared(v_desc, [batch * seqlen_k + n0, col], full,
                                        v_smem.index(buffer))
        for block in range(first + 1, n_blocks):
            _load_qdo(q_desc, do_desc, q_smem, do_smem, qdo_full, qdo_empty,
                      loaded + block - first, q_row0 + block * ROWS, col, STAGES)
        loaded += n_blocks - first
        done += 1


@gluon.jit
def _mask_partition(masks, geometry, drop, CAUSAL: gl.constexpr, N_ROUNDS: gl.constexpr,
                    SEED_IN_MEMORY: gl.constexpr):
    """The mask warps (``_dropout_mask_partition.py``): every tile's query blocks in the
    consumers' order, from each tile's (batch, head) counters."""
    n_tiles, n_kblocks, heads, seqlen_q, seqlen_k = geometry
    seed, counter_base, counters_per_row, drop_threshold, drop_rescale = drop
    n_blocks = seqlen_q // ROWS
    loaded = 0
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        n0, head, batch, first = _tile(tile, n_tiles, n_kblocks, heads, CAUSAL)
        dropout = dropout_arguments(seed, counter_base, batch, heads, head, seqlen_q, 0,
                                    counters_per_row, drop_threshold, SEED_IN_MEMORY)
        for block in range(first, n_blocks):
            write_block_masks(masks, dropout, loaded + block - first, block, n0, N_ROUNDS)
        loaded += n_blocks - first


@gluon.jit
def _consumer(c: gl.constexpr, descs, buffers, bars, geometry, pointers, strides, drop, masks,
              qk_scale, softmax_scale, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, DROPOUT: gl.constexpr, N_ROUNDS: gl.constexpr,
              SEED_IN_MEMORY: gl.constexpr, KV_BUFFERS: gl.constexpr,
              MASK_PARTITION: gl.constexpr, TMA_GRADS: gl.constexpr):
    """Consumer c of each tile: dK and dV of its keys n0 + 64c .. n0 + 64c + 63, and its columns of
    each query block's dQ (``_query_blocks``). ``pointers``: with TMA_GRADS, dK's and dV's TMA
    descriptors in place of their pointers."""
    kv_full, kv_empty, qdo_full, qdo_empty, ds_full, ds_empty = bars
    n_tiles, n_kblocks, heads, seqlen_q, seqlen_k = geometry
    lse_ptr, delta_ptr, grad_k_ptr, grad_v_ptr = pointers
    (stride_lse_b, stride_lse_h, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn,
     stride_dvh) = strides
    seed, counter_base, counters_per_row, drop_threshold, drop_rescale = drop
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, ROWS, 16])
    g_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, ROWS, 16])
    q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, p_smem = buffers
    n_blocks = seqlen_q // ROWS
    loaded = 0
    done = 0
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        n0, head, batch, first = _tile(tile, n_tiles, n_kblocks, heads, CAUSAL)
        batch64 = batch.to(gl.int64)
        head64 = head.to(gl.int64)
        row_stats = batch64 * stride_lse_b + head64 * stride_lse_h
        stats = (lse_ptr + row_stats, delta_ptr + row_stats)
        if DROPOUT:
            dropout = dropout_arguments(seed, counter_base, batch, heads, head, seqlen_q, 0,
                                        counters_per_row, drop_threshold, SEED_IN_MEMORY)
        else:
            dropout = 0
        dk = gl.zeros([ROWS, HEAD_DIM], gl.float32, g_layout)
        dv = gl.zeros([ROWS, HEAD_DIM], gl.float32, g_layout)
        buffer = done % KV_BUFFERS
        mbarrier.wait(kv_full.index(buffer), (done // KV_BUFFERS) & 1)
        if TMA_GRADS:
            # The previous tile's dV store has read the slot this tile's first P goes to.
            tma.store_wait(1)
            gl.thread_barrier()
        tile_buffers = (q_smem, do_smem, k_smem.index(buffer), v_smem.index(buffer), ds_smem,
                        dq_smem, p_smem)
        block_bars = (kv_full.index(buffer), qdo_full, qdo_empty, ds_full, ds_empty)
        dk, dv = _query_blocks(c, descs, tile_buffers, block_bars, dk, dv, stats, dropout, first,
                               n_blocks, n0, loaded, batch * seqlen_q, head * HEAD_DIM, qk_scale,
                               CAUSAL, DROPOUT, N_ROUNDS, STAGES, HEAD_DIM, s_layout, dq_layout,
                               masks, MASK_PARTITION, TMA_GRADS)
        # Every product reading K and V has been waited for: the next tile's may load.
        mbarrier.arrive(kv_empty.index(buffer), count=1)
        dk = dk * softmax_scale
        if DROPOUT:     # kept entries are scaled by 1 / (1 - p), as in the portable pass
            dk = dk * drop_rescale
            dv = dv * drop_rescale
        if TMA_GRADS:
            store_key_gradients(c, dk, dv, p_smem, dq_smem, grad_k_ptr, grad_v_ptr,
                                batch * seqlen_k + n0 + c * ROWS, head * HEAD_DIM, HEAD_DIM)
        else:
            rows = n0 + c * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, g_layout))
            cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, g_layout))
            rows64 = rows.to(gl.int64)[:, None]
            grad_k = grad_k_ptr + batch64 * stride_dkb + head64 * stride_dkh
            grad_v = grad_v_ptr + batch64 * stride_dvb + head64 * stride_dvh
            gl.store(grad_k + rows64 * stride_dkn + cols[None, :], dk.to(grad_k.dtype.element_ty))
            gl.store(grad_v + rows64 * stride_dvn + cols[None, :], dv.to(grad_v.dtype.element_ty))
        loaded += n_blocks - first
        done += 1
    tma.store_wait(0)          # the last stores have read shared memory before the program ends


@gluon.jit(do_not_specialize=["seed", "counter_base"])
def _dkdv_ws_persistent_kernel(
    Q, K, V, GradOut, Lse, Delta, GradK, GradV, GradQAcc, cu_seqlens, seed, counter_base,
    stride_qb, stride_qn, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_gb, stride_gn, stride_gh,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_aqb, stride_aqn, stride_aqh, stride_lse_b, stride_lse_h,
    seqlen_q, seqlen_k, heads_q, group_size, window_left, window_right,
    softmax_scale, qk_scale, counters_per_row, drop_threshold, drop_rescale, batches,
    HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    UPPER: gl.constexpr, LOWER: gl.constexpr, DROPOUT: gl.constexpr, VARLEN: gl.constexpr,
    PRECISION: gl.constexpr, N_ROUNDS: gl.constexpr, MASK_LAYOUT: gl.constexpr,
    STAGES: gl.constexpr, num_warps: gl.constexpr, ACCUMULATE_DQ: gl.constexpr = False,
    SEED_IN_MEMORY: gl.constexpr = False, KV_BUFFERS: gl.constexpr = 1,
    MASK_PARTITION: gl.constexpr = False, TMA_GRADS: gl.constexpr = False,
):
    check_tiles(HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, LOWER, VARLEN, ACCUMULATE_DQ, STAGES, num_warps)
    dtype: gl.constexpr = Q.dtype.element_ty
    n_kblocks = seqlen_k // BLOCK_N
    n_tiles = n_kblocks * heads_q * batches
    qdo_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    dq_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, ROWS], gl.float32)
    columns = heads_q * HEAD_DIM
    q_desc = tma.make_tensor_descriptor(Q, [batches * seqlen_q, columns], [stride_qn, 1],
                                        [ROWS, HEAD_DIM], qdo_layout)
    do_desc = tma.make_tensor_descriptor(GradOut, [batches * seqlen_q, columns], [stride_gn, 1],
                                         [ROWS, HEAD_DIM], qdo_layout)
    k_desc = tma.make_tensor_descriptor(K, [batches * seqlen_k, columns], [stride_kn, 1],
                                        [BLOCK_N, HEAD_DIM], kv_layout)
    v_desc = tma.make_tensor_descriptor(V, [batches * seqlen_k, columns], [stride_vn, 1],
                                        [BLOCK_N, HEAD_DIM], kv_layout)
    dq_desc = tma.make_tensor_descriptor(GradQAcc, [batches * seqlen_q, columns], [stride_aqn, 1],
                                         [ROWS, ROWS], dq_layout)
    # Both consumers arrive when done with a tile's K and V (initialized before the shared fence).
    kv_empty = gl.allocate_shared_memory(gl.int64, [KV_BUFFERS, 1], mbarrier.MBarrierLayout())
    for buffer in gl.static_range(KV_BUFFERS):
        mbarrier.init(kv_empty.index(buffer), count=2)
    if DROPOUT and MASK_PARTITION:
        masks = mask_buffers()
    buffers, block_bars = tiles_and_barriers(dtype, HEAD_DIM, BLOCK_N, STAGES, KV_BUFFERS,
                                             TMA_GRADS)

    descs = (q_desc, do_desc, k_desc, v_desc, dq_desc)
    kv_full, qdo_full, qdo_empty, ds_full, ds_empty = block_bars
    bars = (kv_full, kv_empty, qdo_full, qdo_empty, ds_full, ds_empty)
    geometry = (n_tiles, n_kblocks, heads_q, seqlen_q, seqlen_k)
    if TMA_GRADS:       # dK and dV leave through shared memory, in 64-key boxes
        grad_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
        pointers = (Lse, Delta,
                    tma.make_tensor_descriptor(GradK, [batches * seqlen_k, columns],
                                               [stride_dkn, 1], [ROWS, HEAD_DIM], grad_layout),
                    tma.make_tensor_descriptor(GradV, [batches * seqlen_k, columns],
                                               [stride_dvn, 1], [ROWS, HEAD_DIM], grad_layout))
    else:
        pointers = (Lse, Delta, GradK, GradV)
    strides = (stride_lse_b, stride_lse_h, stride_dkb, stride_dkn, stride_dkh, stride_dvb,
               stride_dvn, stride_dvh)
    drop = (seed, counter_base, counters_per_row, drop_threshold, drop_rescale)
    if DROPOUT and MASK_PARTITION:      # the keep-masks from two warps of their own
        gl.warp_specialize([
            (_consumer, (0, descs, buffers, bars, geometry, pointers, strides, drop, masks,
                         qk_scale, softmax_scale, HEAD_DIM, STAGES, UPPER, DROPOUT, N_ROUNDS,
                         SEED_IN_MEMORY, KV_BUFFERS, True, TMA_GRADS)),
            (_consumer, (1, descs, buffers, bars, geometry, pointers, strides, drop, masks,
                         qk_scale, softmax_scale, HEAD_DIM, STAGES, UPPER, DROPOUT, N_ROUNDS,
                         SEED_IN_MEMORY, KV_BUFFERS, True, TMA_GRADS)),
            (_producer, (descs, buffers, bars, geometry, STAGES, UPPER, HEAD_DIM, KV_BUFFERS)),
            (_mask_partition, (masks, geometry, drop, UPPER, N_ROUNDS, SEED_IN_MEMORY)),
        ], [4, 1, 2], [240, 24, 24])
    else:
        gl.warp_specialize([
            (_consumer, (0, descs, buffers, bars, geometry, pointers, strides, drop, 0, qk_scale,
                         softmax_scale, HEAD_DIM, STAGES, UPPER, DROPOUT, N_ROUNDS,
                         SEED_IN_MEMORY, KV_BUFFERS, False, TMA_GRADS)),
            (_consumer, (1, descs, buffers, bars, geometry, pointers, strides, drop, 0, qk_scale,
                         softmax_scale, HEAD_DIM, STAGES, UPPER, DROPOUT, N_ROUNDS,
                         SEED_IN_MEMORY, KV_BUFFERS, False, TMA_GRADS)),
            (_producer, (descs, buffers, bars, geometry, STAGES, UPPER, HEAD_DIM, KV_BUFFERS)),
        ], [4, 1], [240, 24])
