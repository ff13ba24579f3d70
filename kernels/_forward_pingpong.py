"""Forward pass for Hopper (sm_90) in Gluon with warp specialization: two or three consumer
warpgroups of 64 query rows take turns at the tensor cores while a one-warp producer issues the
TMA copies (FlashAttention-3's ping-pong schedule), in a persistent grid.

Why: in the one-warpgroup Gluon forward (``_forward_gluon.py``) and the portable kernel, the
tensor cores idle while a warpgroup runs its softmax (at head dim 64 a 64-row warpgroup's
exponentials for a 128-key block take as many special-function cycles, 8192 at 16 per cycle, as
its two products take tensor-core cycles; v18 did not settle whether that unit or instruction
issue is the bound). Here each consumer, in its turn, issues S = Q·Kᵀ of the
next key block and O += P·V of this one, passes the turn on (an mbarrier), and runs its softmax
step while the others' products run. Measured in docs/results/attention_notes.md (v18). (Its own
P·V does not run under its softmax step: compiled for sm_90, ptxas places the wait for P·V before
the step's exponentials; ``scripts/kernel_resources.py``'s ``exps_under_mma``, attention_notes v41.)

- Consumers: BLOCK_M // 64 (2 or 3), each with its own 64 rows of a BLOCK_M-row tile; all of a
  tile's consumers take the same key blocks, so the turns alternate strictly. Registers per
  consumer thread: 240 with two, 160 with three (``setmaxnreg``; the producer keeps 24).
- Producer: per tile, Q of each consumer (double-buffered: the next tile's Q lands while this one
  runs), then K and V into KV_STAGES stages as the consumers free them (an mbarrier per stage
  counting one release per consumer).
- Persistent: one program per SM walks the tiles (``programs``), so a tile's start and end (first
  score tile, last P·V, the stores) overlap the producer's loads for the next tile instead of
  leaving an SM idle. Barrier phases continue from tile to tile. HEAD_MAJOR orders the tiles head
  by head (programs running at once share a few heads' K and V), else query block by query block
  (of every head); within a head, the last query block (the most work under the causal mask)
  comes first. Which order is faster depends on the configuration (v18); the tiles name it.
  Causal, query block by query block, every other whole round runs backwards
  (``_pingpong_schedule.tile_coords``).
- With the causal mask (as many queries as keys) the key blocks that reach past the tile's first
  query are masked for all its consumers. A consumer computes only the key blocks up to its own
  last query's; for the tile's remaining blocks it passes its turns on at once
  (``_pingpong_schedule.consumer_blocks``, ``_pingpong_blocks.pass_blocks``).
- Each consumer writes its 64 rows of O through its Q buffer and a TMA store, then frees the
  buffer for the producer.

The same arguments as ``_forward._forward_kernel`` (launch plans pass them) and then ``batches``;
for the calls ``_hopper.pingpong_supported`` lets through: sm_90, padded fp16/bf16 input whose
sequences are rows of one matrix (batch stride = seqlen x row stride, heads adjacent: one 2-D TMA
descriptor per tensor), no window, whole key blocks, queries in whole 64-row blocks, head dim 64
or 128. With dropout each consumer draws its 64 rows' keep-mask for a key block in its softmax
step (``_philox_gluon.dropped``: the mask every kernel regenerates); key blocks are then whole
32-column counter blocks. The last query tile of a sequence may be partial (640 queries in 192-row
tiles): with the causal mask its consumers past the end only pass their turns on; without it
they compute the next sequence's rows (or zeros) and store nothing. The interpreter cannot run
Gluon; the GPU-marked tests run it.

``default_tiles`` chooses it where it was measured faster than the previous default, in the same
process (``_tile_rules.pingpong_forward_tiles``: without dropout, head dim 128 from 512 tokens,
64 causal from 2048, 64 without a mask from 512 (two consumers to 4K); attention_notes v19, v21,
v22, v31, v32; with dropout, head dim 64 causal from 4K, v43); elsewhere it runs for tiles a
caller passes (``Tiles(..., gluon=True, pingpong=True)``).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)

from ._philox_gluon import dropout_arguments, dropped
from ._pingpong_blocks import causal_scores, key_blocks, pass_blocks
from ._pingpong_schedule import (ROWS, consumer_blocks, key_block_range, pass_turn,
                                 tile_coords, wait_turn)


@gluon.jit
def _producer(descs, buffers, bars, geometry, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              KV_STAGES: gl.constexpr, CAUSAL: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
              HEAD_MAJOR: gl.constexpr):
    """One warp: per tile, each consumer's Q (into the tile parity's Q buffers), then K and V of
    every key block as stages free up."""
    q_desc, k_desc, v_desc = descs
    q_smem, k_smem, v_smem = buffers
    q_bars, q_empty, k_bars, v_bars, kv_empty, turns = bars
    n_tiles, n_query_blocks, heads, group_size, seqlen_q, seqlen_k = geometry
    loaded = 0
    it = 0
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        block_m, head, batch = tile_coords(tile, n_tiles, n_query_blocks, heads, CAUSAL,
                                           HEAD_MAJOR)
        head_k = head // group_size
        n_blocks, n_full = key_block_range(block_m, seqlen_k, NUM_CONSUMERS * ROWS, BLOCK_N,
                                           CAUSAL)
        for c in gl.static_range(NUM_CONSUMERS):
            buffer = (it % 2) * NUM_CONSUMERS + c
            mbarrier.wait(q_empty.index(buffer), ((it // 2) & 1) ^ 1)
            mbarrier.expect(q_bars.index(buffer), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(
                q_desc, [batch * seqlen_q + (block_m * NUM_CONSUMERS + c) * ROWS,
                         head * HEAD_DIM],
                q_bars.index(buffer), q_smem.index(buffer))
        for block in range(n_blocks):
            stage = loaded % KV_STAGES
            # A fresh barrier counts as having completed phase 1: the first pass needs no release.
            mbarrier.wait(kv_empty.index(stage), ((loaded // KV_STAGES) & 1) ^ 1)
            row = batch * seqlen_k + block * BLOCK_N
            mbarrier.expect(k_bars.index(stage), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [row, head_k * HEAD_DIM], k_bars.index(stage),
                                            k_smem.index(stage))
            mbarrier.expect(v_bars.index(stage), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [row, head_k * HEAD_DIM], v_bars.index(stage),
                                            v_smem.index(stage))
            loaded += 1
        it += 1


@gluon.jit
def _tile_rows(c: gl.constexpr, q, buffers, bars, out_args, place, blocks, seqlen_q, qk_scale,
               dropout, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, KV_STAGES: gl.constexpr,
               CAUSAL: gl.constexpr, NUM_CONSUMERS: gl.constexpr, DROPOUT: gl.constexpr,
               N_ROUNDS: gl.constexpr, SEED_IN_MEMORY: gl.constexpr, SCHEDULE: gl.constexpr):
    """Consumer c's rows of one tile (``place``: where its blocks and turns start, its rows,
    batch, head and Q buffer): key blocks 0 .. mine - 1 of the tile's ``n_blocks``, the rest's
    turns passed on, then O and lse stored (rows past the end of the sequence are not).
    ``dropout``: (seed, counter base, counters per row, threshold, rescale, query heads)."""
    q_bars, q_empty, k_bars, v_bars, kv_empty, turns = bars
    k_smem = buffers[1]
    v_smem = buffers[2]
    o_desc, lse_ptr0, stride_lse_b, stride_lse_h = out_args
    first, round0, row0, batch, head, buffer = place
    mine, n_blocks, n_full = blocks
    dtype: gl.constexpr = q.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    # Key block 0: S_0 and its softmax step (nothing accumulated yet).
    stage = first % KV_STAGES
    mbarrier.wait(k_bars.index(stage), (first // KV_STAGES) & 1)
    wait_turn(turns, c, round0)
    s = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)),
                      gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout), use_acc=False,
                      is_async=True)
    pass_turn(turns, c, NUM_CONSUMERS)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    if CAUSAL:    # harmless where block 0 is seen whole; query i always sees key 0
        s = causal_scores(s, 0, row0, BLOCK_N, s_layout)
    m_i = gl.max(s, 1) * qk_scale
    p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, 1)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    if DROPOUT:    # the same keep-mask as every other kernel's (_philox.py's counter layout)
        seed, counter_base, counters_per_row, threshold, rescale, heads_q = dropout
        drop = dropout_arguments(seed, counter_base, batch, heads_q, head, seqlen_q, row0,
                                 counters_per_row, threshold, SEED_IN_MEMORY)
        p = dropped(p, 0, drop, ROWS, BLOCK_N, N_ROUNDS, s_layout)
    else:
        drop = 0

    s, p, m_i, l_i, acc = key_blocks(c, q, buffers, bars, s, p, m_i, l_i, acc, 1, n_full,
                                      first, round0, row0, qk_scale, drop, dtype, BLOCK_N,
                                      KV_STAGES, False, NUM_CONSUMERS, DROPOUT, N_ROUNDS,
                                      SCHEDULE, s_layout, o_layout, p_layout)
    if CAUSAL:    # the diagonal blocks up to this consumer's last row, masked
        s, p, m_i, l_i, acc = key_blocks(c, q, buffers, bars, s, p, m_i, l_i, acc,
                                          gl.maximum(n_full, 1), mine, first, round0, row0,
                                          qk_scale, drop, dtype, BLOCK_N, KV_STAGES, True,
                                          NUM_CONSUMERS, DROPOUT, N_ROUNDS, SCHEDULE, s_layout,
                                          o_layout, p_layout)

    last = first + mine - 1
    last_stage = last % KV_STAGES
    mbarrier.wait(v_bars.index(last_stage), (last // KV_STAGES) & 1)
    wait_turn(turns, c, round0 + mine)
    acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_smem.index(last_stage),
                        acc, is_async=True)
    pass_turn(turns, c, NUM_CONSUMERS)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    mbarrier.arrive(kv_empty.index(last_stage), count=1)
    if CAUSAL:    # the others wait on this consumer's turns, not on its store
        pass_blocks(c, bars, mine, n_blocks, first, round0, KV_STAGES, NUM_CONSUMERS)

    # Every row saw at least key 0, so l_i > 0. With dropout the kept weights entered unscaled.
    if DROPOUT:
        acc = acc * (dropout[4] / gl.convert_layout(l_i, o_rows))[:, None]
    else:
        acc = acc / gl.convert_layout(l_i, o_rows)[:, None]
    # O through Q's buffer (every S product of the tile has been waited for) and one TMA
    # store: the 64 x HEAD_DIM store leaves the consumer's registers at once (v29: 2-8 % off
    # the forward against stores from registers). Whole 64-row blocks only (seqlen_q is a
    # multiple of 64); a register path for a partial block cost head dim 64's gain (v29).
    q.store(acc.to(dtype))
    fence_async_shared()
    gl.thread_barrier()
    if row0 < seqlen_q:    # without the mask a partial tile's last consumers have no rows
        tma.async_copy_shared_to_global(o_desc, [batch * seqlen_q + row0, head * HEAD_DIM], q)
    tma.store_wait(0)
    # Q's buffer may be refilled.
    mbarrier.arrive(q_empty.index(buffer), count=1)
    lse_ptr = lse_ptr0 + batch.to(gl.int64) * stride_lse_b + head.to(gl.int64) * stride_lse_h
    lse_rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    gl.store(lse_ptr + lse_rows, m_i + gl.log2(l_i), mask=lse_rows < seqlen_q)


@gluon.jit
def _consumer(c: gl.constexpr, buffers, bars, out_args, geometry, qk_scale, dropout,
              HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, KV_STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, NUM_CONSUMERS: gl.constexpr, HEAD_MAJOR: gl.constexpr,
              DROPOUT: gl.constexpr, N_ROUNDS: gl.constexpr, SEED_IN_MEMORY: gl.constexpr,
              SCHEDULE: gl.constexpr):
    """Consumer c: its 64 query rows of each of the program's tiles, taking turns at the tensor
    cores with the other consumers; writes its rows of O and lse."""
    q_smem = buffers[0]
    q_bars, q_empty, k_bars, v_bars, kv_empty, turns = bars
    n_tiles, n_query_blocks, heads, group_size, seqlen_q, seqlen_k = geometry
    first = 0       # key blocks consumed before this tile
    round0 = 0      # turns taken before this tile
    it = 0          # tiles done
    for tile in range(gl.program_id(0), n_tiles, gl.num_programs(0)):
        block_m, head, batch = tile_coords(tile, n_tiles, n_query_blocks, heads, CAUSAL,
                                           HEAD_MAJOR)
        n_blocks, n_full = key_block_range(block_m, seqlen_k, NUM_CONSUMERS * ROWS, BLOCK_N,
                                           CAUSAL)
        row0 = (block_m * NUM_CONSUMERS + c) * ROWS
        buffer = (it % 2) * NUM_CONSUMERS + c
        q = q_smem.index(buffer)
        mbarrier.wait(q_bars.index(buffer), (it // 2) & 1)
        place = (first, round0, row0, batch, head, buffer)
        if CAUSAL:
            # Each consumer only up to its own rows (v31: -4 to -5.5 % at 1K-2K, head dim 128,
            # and at GPT-2's 4K); without the mask the same branch cost 1-2 % at 4K-8K.
            mine = consumer_blocks(row0, n_blocks, seqlen_q, BLOCK_N)
            if mine > 0:
                _tile_rows(c, q, buffers, bars, out_args, place, (mine, n_blocks, n_full),
                           seqlen_q, qk_scale, dropout, HEAD_DIM, BLOCK_N, KV_STAGES, CAUSAL,
                           NUM_CONSUMERS, DROPOUT, N_ROUNDS, SEED_IN_MEMORY, SCHEDULE)
            else:    # rows past the end of the sequence: only the tile's turns
                wait_turn(turns, c, round0)
                pass_turn(turns, c, NUM_CONSUMERS)
                pass_blocks(c, bars, 0, n_blocks, first, round0, KV_STAGES, NUM_CONSUMERS)
                mbarrier.arrive(q_empty.index(buffer), count=1)
        else:
            _tile_rows(c, q, buffers, bars, out_args, place, (n_blocks, n_blocks, n_full),
                       seqlen_q, qk_scale, dropout, HEAD_DIM, BLOCK_N, KV_STAGES, CAUSAL,
                       NUM_CONSUMERS, DROPOUT, N_ROUNDS, SEED_IN_MEMORY, SCHEDULE)
        first += n_blocks
        round0 += n_blocks + 1
        it += 1


@gluon.jit(do_not_specialize=["seed", "counter_base"])
def _forward_pingpong_kernel(
    Q, K, V, Out, Lse, cu_seqlens, seed, counter_base,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_lse_b, stride_lse_h,
    seqlen_q, seqlen_k, heads_q, group_size, window_left, window_right,
    qk_scale, counters_per_row, drop_threshold, drop_rescale, batches,
    HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    UPPER: gl.constexpr, LOWER: gl.constexpr, DROPOUT: gl.constexpr, VARLEN: gl.constexpr,
    PRECISION: gl.constexpr, N_ROUNDS: gl.constexpr, KV_STAGES: gl.constexpr,
    HEAD_MAJOR: gl.constexpr, num_warps: gl.constexpr, SEED_IN_MEMORY: gl.constexpr = False,
    SCHEDULE: gl.constexpr = 0,
):
    # UPPER is the causal mask here (no window: _hopper.pingpong_call), as many queries as keys.
    gl.static_assert(not (LOWER or VARLEN), "windows and packed input run the other kernels")
    # The keep-mask's counters cover 16-row pairs (a consumer has 64 rows) and 32-column blocks.
    gl.static_assert(not DROPOUT or BLOCK_N % 32 == 0, "dropout needs key blocks of 32 columns")
    gl.static_assert(HEAD_DIM == BLOCK_D, "head_dim must be a power of two (64 or 128)")
    gl.static_assert(num_warps == 4, "the default partition is consumer 0: one warpgroup")
    NUM_CONSUMERS: gl.constexpr = BLOCK_M // ROWS
    gl.static_assert(NUM_CONSUMERS * ROWS == BLOCK_M and (NUM_CONSUMERS == 2 or NUM_CONSUMERS == 3),
                     "BLOCK_M is two or three consumers' 64 rows")
    gl.static_assert(KV_STAGES >= 2, "the next key block must be in flight")
    # The register file split: 65536 per SM over 2 or 3 consumer warpgroups and the producer's.
    CONSUMER_REGS: gl.constexpr = 240 if NUM_CONSUMERS == 2 else 160
    dtype: gl.constexpr = Q.dtype.element_ty
    n_query_blocks = gl.cdiv(seqlen_q, BLOCK_M)
    n_tiles = n_query_blocks * heads_q * batches
    heads_k = heads_q // group_size
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_DIM], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    # (batch x seqlen) rows by (heads x head_dim) columns; a head's tile is the box at
    # [batch x seqlen + row, head x head_dim].
    q_desc = tma.make_tensor_descriptor(Q, [batches * seqlen_q, heads_q * HEAD_DIM],
                                        [stride_qn, 1], [ROWS, HEAD_DIM], q_layout)
    k_desc = tma.make_tensor_descriptor(K, [batches * seqlen_k, heads_k * HEAD_DIM],
                                        [stride_kn, 1], [BLOCK_N, HEAD_DIM], kv_layout)
    v_desc = tma.make_tensor_descriptor(V, [batches * seqlen_k, heads_k * HEAD_DIM],
                                        [stride_vn, 1], [BLOCK_N, HEAD_DIM], kv_layout)
    # Q double-buffered: [tile parity x NUM_CONSUMERS + consumer].
    q_smem = gl.allocate_shared_memory(dtype, [2 * NUM_CONSUMERS, ROWS, HEAD_DIM], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [KV_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [KV_STAGES, BLOCK_N, HEAD_DIM], kv_layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2 * NUM_CONSUMERS, 1],
                                       mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2 * NUM_CONSUMERS, 1],
                                        mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [KV_STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [KV_STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [KV_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2 * NUM_CONSUMERS):
        mbarrier.init(q_bars.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(turns.index(c), count=1)
    for stage in gl.static_range(KV_STAGES):
        mbarrier.init(k_bars.index(stage), count=1)
        mbarrier.init(v_bars.index(stage), count=1)
        mbarrier.init(kv_empty.index(stage), count=NUM_CONSUMERS)
    fence_async_shared()

    descs = (q_desc, k_desc, v_desc)
    buffers = (q_smem, k_smem, v_smem)
    bars = (q_bars, q_empty, k_bars, v_bars, kv_empty, turns)
    # O as one (batch x seqlen) by (heads x head_dim) matrix too: new_outputs makes it contiguous.
    o_desc = tma.make_tensor_descriptor(Out, [batches * seqlen_q, heads_q * HEAD_DIM],
                                        [stride_on, 1], [ROWS, HEAD_DIM], q_layout)
    out_args = (o_desc, Lse, stride_lse_b, stride_lse_h)
    geometry = (n_tiles, n_query_blocks, heads_q, group_size, seqlen_q, seqlen_k)
    dropout = (seed, counter_base, counters_per_row, drop_threshold, drop_rescale, heads_q)
    # The argument tuples are written out in each call: Gluon passes a tuple's constexprs (the
    # consumer's index among them) through only when the tuple is built in the call.
    if NUM_CONSUMERS == 2:
        gl.warp_specialize([
            (_consumer, (0, buffers, bars, out_args, geometry, qk_scale, dropout, HEAD_DIM,
                         BLOCK_N, KV_STAGES, UPPER, NUM_CONSUMERS, HEAD_MAJOR, DROPOUT,
                         N_ROUNDS, SEED_IN_MEMORY, SCHEDULE)),
            (_consumer, (1, buffers, bars, out_args, geometry, qk_scale, dropout, HEAD_DIM,
                         BLOCK_N, KV_STAGES, UPPER, NUM_CONSUMERS, HEAD_MAJOR, DROPOUT,
                         N_ROUNDS, SEED_IN_MEMORY, SCHEDULE)),
            (_producer, (descs, buffers, bars, geometry, BLOCK_N, HEAD_DIM, KV_STAGES, UPPER,
                         NUM_CONSUMERS, HEAD_MAJOR)),
        ], [4, 1], [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([
            (_consumer, (0, buffers, bars, out_args, geometry, qk_scale, dropout, HEAD_DIM,
                         BLOCK_N, KV_STAGES, UPPER, NUM_CONSUMERS, HEAD_MAJOR, DROPOUT,
                         N_ROUNDS, SEED_IN_MEMORY, SCHEDULE)),
            (_consumer, (1, buffers, bars, out_args, geometry, qk_scale, dropout, HEAD_DIM,
                         BLOCK_N, KV_STAGES, UPPER, NUM_CONSUMERS, HEAD_MAJOR, DROPOUT,
                         N_ROUNDS, SEED_IN_MEMORY, SCHEDULE)),
            (_consumer, (2, buffers, bars, out_args, geometry, qk_scale, dropout, HEAD_DIM,
                         BLOCK_N, KV_STAGES, UPPER, NUM_CONSUMERS, HEAD_MAJOR, DROPOUT,
                         N_ROUNDS, SEED_IN_MEMORY, SCHEDULE)),
            (_producer, (descs, buffers, bars, geometry, BLOCK_N, HEAD_DIM, KV_STAGES, UPPER,
                         NUM_CONSUMERS, HEAD_MAJOR)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])
