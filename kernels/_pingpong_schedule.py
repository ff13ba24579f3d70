"""The ping-pong forward's schedule (``_forward_pingpong.py``): which tile a program takes at each
step and in what order, the key blocks of a tile and of each consumer, and the consumers' turns
at the tensor cores."""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from ._gluon_shared import alternate_rounds

ROWS = gl.constexpr(64)     # query rows per consumer warpgroup


@gluon.jit
def key_block_range(block_m, seqlen_k, TILE_M: gl.constexpr, BLOCK_N: gl.constexpr,
                    CAUSAL: gl.constexpr):
    """(key blocks, unmasked key blocks) of query tile ``block_m``."""
    if CAUSAL:    # up to the block of the tile's last query; masked from its first query's
        n_blocks = gl.minimum(gl.cdiv((block_m + 1) * TILE_M, BLOCK_N), seqlen_k // BLOCK_N)
        n_full = (block_m * TILE_M) // BLOCK_N
    else:
        n_blocks = seqlen_k // BLOCK_N
        n_full = n_blocks
    return n_blocks, n_full


@gluon.jit
def tile_coords(tile, n_tiles, n_query_blocks, heads, CAUSAL: gl.constexpr,
                HEAD_MAJOR: gl.constexpr):
    """(query block, head, batch) of the tile a program takes at loop index ``tile``. Within a
    head, tiles run from the last query block (the most work with the causal mask) to the first.
    HEAD_MAJOR: the tiles of one head are consecutive, so the programs running at once share few
    heads' K and V in L2; else the tiles of one query block (of every head) are.

    Causal, query block by query block, a round of the grid takes tiles of falling work, so every
    other whole round runs backwards (``_gluon_shared.alternate_rounds``): a static simulation of
    132 programs puts the busiest 7-9 % above the mean at head dim 128 and 4K-16K tokens and at
    GPT-2 small's 12 heads and 4K, against 0.2-1 % with the reversal. Measured (attention_notes
    v30, 16K tokens, two processes each): head dim 128 -4.5 / -6 / -8 % at 4K / 8K / 16K, head
    dim 64 at 32 heads -2 / -3 % at 8K / 16K, at 12 heads -3 % at 4K and 8K; 1K and no mask level."""
    if CAUSAL and not HEAD_MAJOR:
        tile = alternate_rounds(tile, n_tiles)
    if HEAD_MAJOR:
        block_m = n_query_blocks - 1 - tile % n_query_blocks
        pair = tile // n_query_blocks
    else:
        block_m = n_query_blocks - 1 - tile // (n_tiles // n_query_blocks)
        pair = tile % (n_tiles // n_query_blocks)
    return block_m, pair % heads, pair // heads


@gluon.jit
def wait_turn(turns, c: gl.constexpr, round):
    """Consumer c's ``round``-th turn: consumer 0 goes first (its first wait is on the fresh
    barrier's completed phase 1), consumer c > 0 after consumer c - 1's first arrival."""
    first: gl.constexpr = 1 if c == 0 else 0
    mbarrier.wait(turns.index(c), (round + first) & 1)


@gluon.jit
def pass_turn(turns, c: gl.constexpr, NUM_CONSUMERS: gl.constexpr):
    """The tensor cores go to the next consumer in the ring."""
    mbarrier.arrive(turns.index((c + 1) % NUM_CONSUMERS), count=1)


@gluon.jit
def consumer_blocks(row0, n_blocks, seqlen_q, BLOCK_N: gl.constexpr):
    """Under the causal mask, how many of its tile's ``n_blocks`` key blocks the consumer whose
    rows start at ``row0`` computes: none past its last row's block (the tile's other consumers
    see further), and none at all for rows past the end of the sequence (a partial tile)."""
    mine = gl.minimum(n_blocks, (row0 + ROWS - 1) // BLOCK_N + 1)
    if row0 >= seqlen_q:
        mine = 0
    return mine
