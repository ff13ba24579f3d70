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


@triton.jit
def visible_tile(rows, cols, len_k, diagonal, CAUSAL: tl.constexpr):
    """(rows, cols) boolean: key exists and, if causal, query i sees key j <= i + diagonal."""
    visible = cols[None, :] < len_k
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + diagonal)
    return visible


@triton.jit
def full_key_blocks_end(m0, len_k, diagonal, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr):
    """End of the key blocks that every query row of [m0, m0 + BLOCK_M) sees entirely: these need
    no mask. Causal: the block's last key must be visible to the block's first query."""
    end = len_k // BLOCK_N * BLOCK_N
    if CAUSAL:
        end = tl.minimum(end, tl.maximum(m0 + diagonal + 1, 0) // BLOCK_N * BLOCK_N)
    return end


@triton.jit
def causal_key_end(m0, len_k, diagonal, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key any query of [m0, m0 + BLOCK_M) may see."""
    if CAUSAL:
        return tl.maximum(tl.minimum(len_k, m0 + BLOCK_M + diagonal), 0)
    return len_k
