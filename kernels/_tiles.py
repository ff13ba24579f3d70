"""Small @triton.jit helpers shared by the forward and backward kernels."""

import triton
import triton.language as tl


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
