"""The dropout keep-mask of ``_philox.py`` for Gluon kernels (sm_90), generated in the layout of the
warpgroup MMA accumulator that holds the scores.

The portable kernels get "each thread computes only the Philox counters it holds" from Triton's
layout propagation through ``dropout_keep_tile``'s reshape. Gluon has no such propagation for
explicit layouts, but its ``AutoLayout`` has: the tile is built with automatic layouts along the
same seven axes (row 16u + 8s + g, column 32a + 8w + 2t + c) and its layout fixed only at the end,
to the accumulator's, so the compiler assigns every axis the way that accumulator holds it.
Compiled for sm_90 there is no layout conversion and each thread runs Philox for its own counters
only: two per 64 x 64 tile with 4 warps (tests/kernels/test_philox_gluon.py). In the transposed
orientation (keys along rows, as the Gluon dK/dV pass holds its tiles) the same construction makes
each thread compute four times as many counters; there the tile is generated in the forward's
orientation and converted.

Used by the Gluon dQ and dK/dV passes with dropout. Its mask must equal ``_debug_mask.keep_mask``
bit for bit (a GPU test), which is what makes it the same dropout as the portable kernels'.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from ._launch import Geometry
from ._philox import PHILOX_ROUNDS, counters_per_row, kernel_counter_base, kernel_seed


@gluon.jit
def philox4x32(seed, counters, N_ROUNDS: gl.constexpr):
    """Triton's ``randint4x(seed, counters, N_ROUNDS)`` (``triton/language/random.py``): the same
    four words for the same 64-bit counters and seed."""
    c0 = counters.to(gl.uint32)
    c1 = (counters >> 32).to(gl.uint32)
    c2 = c0 * 0
    c3 = c2
    key = seed.to(gl.uint64)
    k0 = (key & 0xFFFFFFFF).to(gl.uint32)
    k1 = ((key >> 32) & 0xFFFFFFFF).to(gl.uint32)
    for _ in gl.static_range(N_ROUNDS):
        previous0 = c0
        previous2 = c2
        c0 = gl.umulhi(previous2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = gl.umulhi(previous0, 0xD2511F53) ^ c3 ^ k1
        c1 = previous2 * 0xCD9E8D57
        c3 = previous0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@gluon.jit
def dropout_arguments(seed, counter_base, batch, heads_q, head, seqlen_q, first_row,
                      counters_per_row, drop_threshold, SEED_IN_MEMORY: gl.constexpr):
    """What ``keep_tile`` and ``keep_tile_transposed`` take, as one tuple: (seed, counter base,
    the first row pair of rows from ``first_row`` of this (batch, head) in the counter layout
    (``_philox.head_first_pair``), counters per row, threshold). With ``SEED_IN_MEMORY`` ``seed``
    points at a seed drawn on the device (``_philox.device_seed``) and is loaded here."""
    if SEED_IN_MEMORY:
        seed = gl.load(seed)
    first_pair = (batch.to(gl.int64) * heads_q + head) * (gl.cdiv(seqlen_q, 16) * 8) + first_row // 2
    return (seed, counter_base, first_pair, counters_per_row, drop_threshold)


@gluon.jit
def keep_tile(seed, counter_base, first_pair, counters_per_row, col_start, drop_threshold,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, N_ROUNDS: gl.constexpr,
              layout: gl.constexpr):
    """Keep-mask of the (BLOCK_M, BLOCK_N) tile whose row pairs start at ``first_pair`` (the head's
    first pair + m0 // 2, m0 a multiple of 16) and whose columns start at ``col_start`` (a multiple
    of 32), in ``layout``: ``_philox.dropout_keep_tile`` for Gluon."""
    return gl.set_auto_layout(_keep_tile_auto(seed, counter_base, first_pair, counters_per_row,
                                              col_start, drop_threshold, BLOCK_M, BLOCK_N,
                                              N_ROUNDS), layout)


@gluon.jit
def _keep_tile_auto(seed, counter_base, first_pair, counters_per_row, col_start, drop_threshold,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, N_ROUNDS: gl.constexpr):
    """``keep_tile`` with its layout still automatic."""
    PAIR_BLOCKS: gl.constexpr = BLOCK_M // 16
    BLOCKS: gl.constexpr = BLOCK_N // 32
    auto: gl.constexpr = gl.AutoLayout()
    # Axes (u, s, g, a, w, t, c): row 16u + 8s + g, column 32a + 8w + 2t + c.
    u = gl.arange(0, PAIR_BLOCKS, layout=auto)[:, None, None, None, None, None, None]
    s = gl.arange(0, 2, layout=auto)[None, :, None, None, None, None, None]
    g = gl.arange(0, 8, layout=auto)[None, None, :, None, None, None, None]
    a = gl.arange(0, BLOCKS, layout=auto)[None, None, None, :, None, None, None]
    w = gl.arange(0, 4, layout=auto)[None, None, None, None, :, None, None]
    t = gl.arange(0, 4, layout=auto)[None, None, None, None, None, :, None]
    c = gl.arange(0, 2, layout=auto)[None, None, None, None, None, None, :]
    pairs = first_pair + (8 * u + g).to(gl.int64)
    counters = counter_base + pairs * counters_per_row + (col_start // 8 + 4 * a + t)
    w0, w1, w2, w3 = philox4x32(seed, counters, N_ROUNDS)
    word = gl.where(w == 0, w0, gl.where(w == 1, w1, gl.where(w == 2, w2, w3)))
    byte = ((word >> (16 * s + 8 * c).to(gl.uint32)) & 0xFF).to(gl.int32)
    return gl.reshape(byte >= drop_threshold, [BLOCK_M, BLOCK_N])


@gluon.jit
def dropped(p, block, dropout, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
            N_ROUNDS: gl.constexpr, layout: gl.constexpr):
    """Probabilities ``p`` (BLOCK_M rows, key block ``block`` of BLOCK_N columns, in ``layout``)
    with the dropped entries 0; ``dropout`` is ``dropout_arguments``' tuple for the tile's first
    row. The forwards' P for P.V; the row sums take the undropped ``p``."""
    seed, counter_base, first_pair, counters_per_row, threshold = dropout
    keep = keep_tile(seed, counter_base, first_pair, counters_per_row, block * BLOCK_N, threshold,
                     BLOCK_M, BLOCK_N, N_ROUNDS, layout)
    return gl.where(keep, p, 0.0)


@gluon.jit
def keep_tile_transposed(seed, counter_base, first_pair, counters_per_row, col_start,
                         drop_threshold, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         N_ROUNDS: gl.constexpr, MASK_LAYOUT: gl.constexpr,
                         num_warps: gl.constexpr, layout: gl.constexpr):
    """The transposed keep-mask, (BLOCK_N keys, BLOCK_M queries), in ``layout`` (the accumulator
    of a transposed score tile). "untransposed": generated in the forward's orientation, where
    each thread computes only its own counters, and moved through shared memory; "broadcast":
    generated in ``layout`` directly, each thread computing every counter it touches (4x the
    Philox work, no shared memory)."""
    if MASK_LAYOUT == "untransposed":
        # Warps over whole 16-row pair blocks and whole 32-column counter blocks, so that no two
        # threads compute the same counter.
        WARPS_M: gl.constexpr = num_warps if num_warps <= BLOCK_M // 16 else BLOCK_M // 16
        WARPS_N: gl.constexpr = num_warps // WARPS_M
        gl.static_assert(WARPS_M * WARPS_N == num_warps and (BLOCK_N // WARPS_N) % 32 == 0,
                         "each warp needs whole 16-row and 32-column blocks of the mask")
        forward: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS_M, WARPS_N],
            instr_shape=[16, BLOCK_N // WARPS_N, 16])
        keep = keep_tile(seed, counter_base, first_pair, counters_per_row, col_start,
                         drop_threshold, BLOCK_M, BLOCK_N, N_ROUNDS, forward)
        keep = gl.convert_layout(gl.permute(keep.to(gl.int8), [1, 0]), layout) != 0
    else:
        keep = _keep_tile_auto(seed, counter_base, first_pair, counters_per_row, col_start,
                               drop_threshold, BLOCK_M, BLOCK_N, N_ROUNDS)
        keep = gl.set_auto_layout(gl.permute(keep, [1, 0]), layout)
    return keep


@gluon.jit(do_not_specialize=["seed", "counter_base"])
def _keep_mask_gluon_kernel(Mask, seqlen_q, seqlen_k, seed, counter_base, counters_per_row,
                            drop_threshold, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                            N_ROUNDS: gl.constexpr, num_warps: gl.constexpr):
    """``_debug_mask._keep_mask_kernel`` with the tile in the MMA accumulator layout of the Gluon
    forward's score tile; whole blocks only (seqlen_q % BLOCK_M == seqlen_k % BLOCK_N == 0)."""
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, BLOCK_N, 16])
    m0 = gl.program_id(0) * BLOCK_M
    n0 = gl.program_id(1) * BLOCK_N
    batch_head = gl.program_id(2).to(gl.int64)       # b * heads_q + h
    first_pair = batch_head * (gl.cdiv(seqlen_q, 16) * 8) + m0 // 2
    keep = keep_tile(seed, counter_base, first_pair, counters_per_row, n0, drop_threshold,
                     BLOCK_M, BLOCK_N, N_ROUNDS, layout)
    rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
    gl.store(Mask + (batch_head * seqlen_q + rows)[:, None] * seqlen_k + cols[None, :],
             keep.to(gl.int8))


def keep_mask(geometry: Geometry, seed: int, offset: int, drop_threshold: int,
              device: torch.device, block_m: int = 64, block_n: int = 64,
              num_warps: int = 4) -> torch.Tensor:
    """``_debug_mask.keep_mask`` generated by the Gluon tile (sm_90; test-only)."""
    if geometry.seqlen_q % block_m or geometry.seqlen_k % block_n:
        raise ValueError(f"keep_mask: whole blocks only ({geometry.seqlen_q} x {geometry.seqlen_k} "
                         f"in {block_m} x {block_n} tiles)")
    shape = (geometry.batch, geometry.heads_q, geometry.seqlen_q, geometry.seqlen_k)
    mask = torch.empty(shape, dtype=torch.int8, device=device)
    grid = (geometry.seqlen_q // block_m, geometry.seqlen_k // block_n,
            geometry.batch * geometry.heads_q)
    _keep_mask_gluon_kernel[grid](mask, geometry.seqlen_q, geometry.seqlen_k, kernel_seed(seed),
                                  kernel_counter_base(offset), counters_per_row(geometry.seqlen_k),
                                  drop_threshold, BLOCK_M=block_m, BLOCK_N=block_n,
                                  N_ROUNDS=PHILOX_ROUNDS, num_warps=num_warps)
    return mask.bool()
