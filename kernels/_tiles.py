"""Small @triton.jit helpers shared by the forward and backward kernels."""

import triton
import triton.language as tl

from ._philox import dropout_keep_tile


@triton.jit
def sequence_bounds(cu_seqlens, batch_index, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first token, query length, key length) of one sequence."""
    if VARLEN:
        start = tl.load(cu_seqlens + batch_index)
        length = tl.load(cu_seqlens + batch_index + 1) - start
        return start, length, length
    # A tensor zero (not the literal 0) so callers can cast it like the loaded start.
    return tl.zeros((), dtype=tl.int32), seqlen_q, seqlen_k


@triton.jit
def load_rows(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile, masking only what can be out of range: rows past the sequence
    end (when MASK_ROWS) and the padding columns of a head_dim that is not a power of two."""
    if MASK_ROWS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return tile


@triton.jit
def store_rows(ptrs, tile, row_ok, d_ok, EVEN_D: tl.constexpr):
    if EVEN_D:
        tl.store(ptrs, tile, mask=row_ok[:, None])
    else:
        tl.store(ptrs, tile, mask=row_ok[:, None] & d_ok[None, :])


# Which keys a query sees. Rows i and columns j index the query's and the key's own sequence.
#   UPPER: j <= i + upper, with upper = (len_k - len_q) + window_right; causal is window_right = 0
#          (aligned bottom-right).
#   LOWER: j >= i + lower, with lower = (len_k - len_q) - window_left (sliding window).
# Without a flag that side is unbounded. Key blocks entirely outside [i + lower, i + upper] for
# every row of a query block are never loaded, so a window of W keys costs O(N·W), not O(N²).


@triton.jit
def visible_tile(rows, cols, len_k, upper, lower, UPPER: tl.constexpr, LOWER: tl.constexpr):
    """(rows, cols) boolean: the key exists and lies in the query's band."""
    visible = cols[None, :] < len_k
    if UPPER:
        visible = visible & (cols[None, :] <= rows[:, None] + upper)
    if LOWER:
        visible = visible & (cols[None, :] >= rows[:, None] + lower)
    return visible


@triton.jit
def key_block_ranges(m0, len_k, upper, lower, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     UPPER: tl.constexpr, LOWER: tl.constexpr):
    """Key ranges of the query block [m0, m0 + BLOCK_M): ``(start, full_start, full_end, end)``.
    Keys in [start, end) are the only ones any row may see; the key blocks of
    [full_start, full_end) are seen entirely by every row (they need no mask), those of
    [start, full_start) and [full_end, end) only in part. start and both full bounds are multiples
    of BLOCK_N."""
    if UPPER:
        end = tl.maximum(tl.minimum(len_k, m0 + BLOCK_M + upper), 0)
        # the block's last key must be visible to the block's first query
        full_end = tl.minimum(len_k // BLOCK_N * BLOCK_N, tl.maximum(m0 + upper + 1, 0) // BLOCK_N * BLOCK_N)
    else:
        end = len_k
        full_end = len_k // BLOCK_N * BLOCK_N
    if LOWER:
        start = tl.minimum(tl.maximum(m0 + lower, 0) // BLOCK_N * BLOCK_N, end)
        # the block's first key must be visible to the block's last query
        full_start = tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 + lower, 0), BLOCK_N) * BLOCK_N
        full_start = tl.minimum(tl.maximum(full_start, start), end)
    else:
        start = tl.zeros((), dtype=tl.int32)
        full_start = tl.zeros((), dtype=tl.int32)
    full_end = tl.maximum(full_end, full_start)
    return start, full_start, full_end, end


@triton.jit
def online_softmax_block(acc, l_i, m_i, q, k, rows, n0, cols, len_k, upper, lower, qk_scale,
                         seed, pair_counters, drop_threshold, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, MASKED: tl.constexpr, UPPER: tl.constexpr,
                         LOWER: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
                         N_ROUNDS: tl.constexpr):
    """One key block ``n0`` (its keys ``cols``) of the forward's online softmax (base 2, scale folded into one FMA): the
    block's weights ``p`` (dropped ones zeroed, kept ones unscaled: the output takes 1 / (1 - p)
    once), the accumulator rescaled to the new row maximum, the new denominator and maximum.
    Returns ``(p, acc, l_i, m_new)``; the caller adds ``p @ V`` to ``acc``."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED:
        scores = tl.where(visible_tile(rows, cols, len_k, upper, lower, UPPER, LOWER), scores,
                          float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
        # A row that has seen no visible key yet keeps m = -inf; shift it by 0, not inf - inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
        m_shift = m_new
    p = tl.math.exp2(scores * qk_scale - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        keep = dropout_keep_tile(seed, pair_counters, n0, drop_threshold, BLOCK_M, BLOCK_N,
                                 N_ROUNDS)
        p = tl.where(keep, p, 0.0)
    return p, acc, l_i, m_new


@triton.jit
def transposed_probabilities(k, q, lse, rows, cols, len_k, upper, lower, qk_scale,
                             MASKED: tl.constexpr, UPPER: tl.constexpr, LOWER: tl.constexpr,
                             PRECISION: tl.constexpr):
    """The backward's recomputed probabilities of one tile, transposed: (keys ``cols``, queries
    ``rows``), so that dK and dV accumulate without a transpose. Outside the band: 0."""
    scoresT = tl.dot(k, tl.trans(q), input_precision=PRECISION)
    pT = tl.math.exp2(scoresT * qk_scale - lse[None, :])
    if MASKED:
        visibleT = cols[:, None] < len_k
        if UPPER:
            visibleT = visibleT & (cols[:, None] <= rows[None, :] + upper)
        if LOWER:
            visibleT = visibleT & (cols[:, None] >= rows[None, :] + lower)
        pT = tl.where(visibleT, pT, 0.0)
    return pT


@triton.jit
def normalized_rows(acc, l_i, m_i, drop_rescale, DROPOUT: tl.constexpr):
    """The forward's output rows and their log-sum-exp (base 2) from the online softmax's state.
    Rows that saw no key (causal with len_q > len_k, or a window past the keys) output zeros and
    get lse = +inf, so the backward's exp2(score - lse) is 0 for them. With dropout the kept
    weights entered unscaled: 1 / (1 - p) is applied here, once."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if DROPOUT:
        acc = acc * (drop_rescale / l_safe)[:, None]
    else:
        acc = acc / l_safe[:, None]
    return acc, tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
