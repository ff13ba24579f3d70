"""A ping-pong forward consumer's key blocks (``_forward_pingpong.py``): the blocks it computes,
each in its turn at the tensor cores (S of the block and P.V of the one before issued together,
then the online-softmax step, with dropout's keep-mask, under P.V), and the turns of blocks its
rows do not need, passed on."""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

from ._philox_gluon import dropped, keep_tile
from ._pingpong_schedule import ROWS, pass_turn, wait_turn


@gluon.jit
def causal_scores(s, block, row0, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """Scores of key block ``block`` with the keys after each query (rows from ``row0``) -inf."""
    rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    cols = block * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    return gl.where(cols[None, :] <= rows[:, None], s, float("-inf"))


@gluon.jit
def softmax_step(s, m_i, l_i, qk_scale, block, drop, keep, BLOCK_N: gl.constexpr, DROPOUT: gl.constexpr,
          N_ROUNDS: gl.constexpr, MASK_EARLY: gl.constexpr, s_layout: gl.constexpr):
    """The online-softmax step on key block ``block``'s scores: (probabilities for P.V, dropped
    with dropout; new row maxima; new row sums of the undropped probabilities; the factor O's
    rows owe the new maxima)."""
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    if DROPOUT:
        if MASK_EARLY:
            p = gl.where(keep != 0, p, 0.0)
        else:
            p = dropped(p, block, drop, ROWS, BLOCK_N, N_ROUNDS, s_layout)
    return p, m_new, l_i, alpha


@gluon.jit
def key_blocks(c: gl.constexpr, q, buffers, bars, s, p, m_i, l_i, acc, begin, end, first, round0,
                row0, qk_scale, drop, dtype: gl.constexpr, BLOCK_N: gl.constexpr,
                KV_STAGES: gl.constexpr, CAUSAL_MASK: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                DROPOUT: gl.constexpr, N_ROUNDS: gl.constexpr, SCHEDULE: gl.constexpr,
                s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
    """Consumer c's key blocks ``begin`` .. ``end`` - 1 of a tile whose block 0 is the ``first``-th
    loaded overall and whose first turn is ``round0``: per block, in its turn, S of this block and
    P.V of the one before are issued; then the softmax step under P.V (with dropout, the block's
    keep-mask drawn there too: ``drop`` is ``dropout_arguments``' tuple for the consumer's rows).
    On entry ``p`` holds block begin - 1's probabilities (dropped); on exit block end - 1's.

    ``SCHEDULE`` (unmeasured options; an A/B keeps what wins): bit 0, with dropout the mask drawn
    while the products run instead of after the step; bit 1, the step in a loop that runs once, so
    that ptxas keeps the wait for P.V below it instead of moving it ahead of the exponentials
    (attention_notes v41: compiled, 34-66 exponentials then run under P.V instead of 0)."""
    MASK_EARLY: gl.constexpr = SCHEDULE % 2 == 1
    STEP_LOOP: gl.constexpr = SCHEDULE // 2 % 2 == 1
    q_smem, k_smem, v_smem = buffers
    q_bars, q_empty, k_bars, v_bars, kv_empty, turns = bars
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    for following in range(begin, end):
        index = first + following
        stage = index % KV_STAGES
        mbarrier.wait(k_bars.index(stage), (index // KV_STAGES) & 1)
        current_stage = (index - 1) % KV_STAGES
        mbarrier.wait(v_bars.index(current_stage), ((index - 1) // KV_STAGES) & 1)
        wait_turn(turns, c, round0 + following)
        s = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s, use_acc=False,
                          is_async=True)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout),
                            v_smem.index(current_stage), acc, is_async=True)
        pass_turn(turns, c, NUM_CONSUMERS)
        # Products complete in issue order: one outstanding means S_following is done while
        # P_current.V_current may still run under the softmax step.
        if DROPOUT and MASK_EARLY:
            # Philox needs no scores: the mask drawn while this consumer's products run, and
            # passed through the wait (as 32-bit values, the narrowest it takes) so that the
            # compiler cannot sink it past the wait.
            seed, counter_base, first_pair, counters_per_row, threshold = drop
            keep = keep_tile(seed, counter_base, first_pair, counters_per_row,
                             following * BLOCK_N, threshold, ROWS, BLOCK_N, N_ROUNDS, s_layout)
            s, keep = warpgroup_mma_wait(num_outstanding=1, deps=(s, keep.to(gl.int32)))
        else:
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
            keep = 0
        if CAUSAL_MASK:
            s = causal_scores(s, following, row0, BLOCK_N, s_layout)
        if STEP_LOOP:
            alpha = m_i
            # Always one pass (row0 >= 0), which the compiler cannot know.
            for _ in range((row0 >= 0).to(gl.int32)):
                p, m_i, l_i, alpha = softmax_step(s, m_i, l_i, qk_scale, following, drop, keep, BLOCK_N,
                                           DROPOUT, N_ROUNDS, MASK_EARLY, s_layout)
        else:
            p, m_i, l_i, alpha = softmax_step(s, m_i, l_i, qk_scale, following, drop, keep, BLOCK_N,
                                       DROPOUT, N_ROUNDS, MASK_EARLY, s_layout)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        # This consumer is done with K_current and V_current.
        mbarrier.arrive(kv_empty.index(current_stage), count=1)
    return s, p, m_i, l_i, acc


@gluon.jit
def pass_blocks(c: gl.constexpr, bars, begin, end, first, round0, KV_STAGES: gl.constexpr,
                 NUM_CONSUMERS: gl.constexpr):
    """Consumer c's turns for the tile's key blocks ``begin`` .. ``end`` - 1, which its rows do
    not need: each turn passed on at once, so the other consumers' products get the tensor cores
    sooner, and each block's K/V stage released once loaded (the release then counts in that
    load's phase, not the stage's previous one)."""
    q_bars, q_empty, k_bars, v_bars, kv_empty, turns = bars
    for block in range(begin, end):
        index = first + block
        stage = index % KV_STAGES
        mbarrier.wait(k_bars.index(stage), (index // KV_STAGES) & 1)
        wait_turn(turns, c, round0 + block + 1)
        pass_turn(turns, c, NUM_CONSUMERS)
        mbarrier.arrive(kv_empty.index(stage), count=1)
