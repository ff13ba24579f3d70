"""The warp-specialized dK/dV pass's shared memory, barriers and compile-time checks, shared by
its two grids: one program per key block (``_dkdv_warp_specialized.py``) and the persistent one
(``_dkdv_ws_persistent.py``)."""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

ROWS = gl.constexpr(64)         # queries per block, keys per consumer warpgroup


@gluon.jit
def tiles_and_barriers(dtype: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                       STAGES: gl.constexpr, KV_BUFFERS: gl.constexpr, TMA_GRADS: gl.constexpr):
    """The pass's shared memory: STAGES stages of Q and dO, KV_BUFFERS buffers of a key block's K
    and V (the persistent grid loads the next tile's into a second one), two dS tiles (64 queries
    x all 128 keys), a P tile per consumer (with TMA_GRADS of twice the rows: P in the first half,
    ``p_slot``, and the whole stages dK and dV, ``store_key_gradients``), a dQ staging tile per
    consumer (its columns of every block's dQ at head dim 128, every other block's dQ at 64); and
    its barriers, initialized and
    fenced: (kv_full, one per K/V buffer, qdo_full, qdo_empty, ds_full, ds_empty). Barriers the
    caller initialized before this call are fenced with them. The tiles' layouts are the TMA
    boxes' (``head_descriptor``)."""
    qdo_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    dq_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, ROWS], gl.float32)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, ROWS, HEAD_DIM], qdo_layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, ROWS, HEAD_DIM], qdo_layout)
    k_smem = gl.allocate_shared_memory(dtype, [KV_BUFFERS, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [KV_BUFFERS, BLOCK_N, HEAD_DIM], kv_layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_N], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [2, ROWS, BLOCK_N], ds_layout)
    p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, ROWS], dtype)
    p_smem = gl.allocate_shared_memory(dtype, [2, 2 * ROWS if TMA_GRADS else ROWS, ROWS], p_layout)
    dq_smem = gl.allocate_shared_memory(gl.float32, [2, ROWS, ROWS], dq_layout)
    kv_full = gl.allocate_shared_memory(gl.int64, [KV_BUFFERS, 1], mbarrier.MBarrierLayout())
    qdo_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ds_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for buffer in gl.static_range(KV_BUFFERS):
        mbarrier.init(kv_full.index(buffer), count=1)
    for stage in gl.static_range(STAGES):
        mbarrier.init(qdo_full.index(stage), count=1)
        mbarrier.init(qdo_empty.index(stage), count=2)
    for buffer in gl.static_range(2):
        mbarrier.init(ds_full.index(buffer), count=2)
        mbarrier.init(ds_empty.index(buffer), count=2)
    fence_async_shared()
    buffers = (q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, p_smem)
    return buffers, (kv_full, qdo_full, qdo_empty, ds_full, ds_empty)


@gluon.jit
def check_tiles(HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr, LOWER: gl.constexpr, VARLEN: gl.constexpr,
                ACCUMULATE_DQ: gl.constexpr, STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
    """What both grids of the pass support, checked when they compile."""
    gl.static_assert(not (LOWER or VARLEN), "no window or packed input")
    # The keep-mask's counters cover 16-row pairs and 32-column blocks (_philox.py): whole ones
    # here (64-query blocks, 64 keys per consumer).
    gl.static_assert(ACCUMULATE_DQ, "the fused pass only")
    gl.static_assert(BLOCK_M == ROWS and BLOCK_N == 2 * ROWS and NUM_WARPS == 4,
                     "64-query blocks, 128-key blocks over two consumer warpgroups")
    gl.static_assert(HEAD_DIM == BLOCK_D, "head_dim must be a power of two (64 or 128)")
    gl.static_assert(STAGES >= 2, "the next query block must be in flight")


@gluon.jit
def p_slot(p_smem, c: gl.constexpr, TMA_GRADS: gl.constexpr):
    """Consumer c's P tile: the first half of its slot with TMA_GRADS."""
    if TMA_GRADS:
        tile = p_smem.index(c).slice(0, ROWS, dim=0)
    else:
        tile = p_smem.index(c)
    return tile


@gluon.jit
def store_key_gradients(c: gl.constexpr, dk, dv, p_smem, dq_smem, dk_desc, dv_desc, row, col,
                        HEAD_DIM: gl.constexpr):
    """Consumer c's dK and dV (scaled, float32) through shared memory and two TMA stores, which
    leave the consumer's registers at once. Stored from registers, each thread's scattered 4-byte
    stores held the consumers ~73 us per backward at 16K tokens and head dim 128 (~5 us a tile
    in the persistent grid at 512 tokens; attention_notes v37). Staged in the consumer's P slot
    of 128 x 64 (dV) and, at head dim 128, its dQ staging tile (dK; at 64 the P slot holds both).
    The last dQ reduce and the previous stores must have read them first; the consumer's next P
    store must wait for the dV store (``tma.store_wait(1)``: dK's store may still run)."""
    dtype: gl.constexpr = p_smem.dtype
    slot = p_smem.index(c)
    if HEAD_DIM == ROWS:
        dv_tile = slot.slice(0, ROWS, dim=0)
        dk_tile = slot.slice(ROWS, ROWS, dim=0)
    else:
        layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
        dv_tile = slot._reinterpret(dtype, [ROWS, HEAD_DIM], layout)
        dk_tile = dq_smem.index(c)._reinterpret(dtype, [ROWS, HEAD_DIM], layout)
    tma.store_wait(0)
    gl.thread_barrier()
    dv_tile.store(dv.to(dtype))
    dk_tile.store(dk.to(dtype))
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(dv_desc, [row, col], dv_tile)
    tma.async_copy_shared_to_global(dk_desc, [row, col], dk_tile)
