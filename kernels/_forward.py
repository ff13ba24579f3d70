"""Forward pass: one program per (query block, head, sequence); K/V streamed with an online softmax.

Writes O and the row log-sum-exp (base 2, of the scaled scores) and nothing else; the backward
recomputes the score tiles from them. The key loop runs in three stages: the blocks a sliding window's lower
edge cuts (masked), the blocks every query of the block sees entirely (no masks), then the causal
diagonal, a right window edge and the ragged end (masked). Blocks outside the band are skipped.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from . import _forward_gluon, _forward_pingpong, _forward_tma, _hopper
from ._direct_launch import DirectLauncher, grid3
from ._launch import (NO_WINDOW, Geometry, Tiles, Window, band_flags, band_offsets, batched_strides,
                      dot_precision)
from ._tile_rules import forward_tiles, gluon_forward_tiles, pingpong_forward_tiles, tma_forward_tiles
from ._philox import (PHILOX_ROUNDS, counters_per_row, drop_rescale, drop_threshold,
                      head_first_pair, pair_counter_base, seed_arguments)
from ._tiles import (key_block_ranges, load_rows, normalized_rows, online_softmax_block,
                     sequence_bounds, store_rows)

LOG2E = math.log2(math.e)


@triton.jit
def _attend_key_blocks(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, lo, hi,
                       rows, offs_n, d_ok, len_k, upper, lower, qk_scale,
                       seed, pair_counters, drop_threshold,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
                       MASKED: tl.constexpr, UPPER: tl.constexpr, LOWER: tl.constexpr,
                       DROPOUT: tl.constexpr,
                       PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        k = load_rows(k_ptrs + n0 * stride_kn, cols < len_k, d_ok, MASKED, EVEN_D)
        p, acc, l_i, m_new = online_softmax_block(
            acc, l_i, m_i, q, k, rows, n0, cols, len_k, upper, lower, qk_scale, seed,
            pair_counters, drop_threshold, BLOCK_M, BLOCK_N, MASKED, UPPER, LOWER, DROPOUT,
            PRECISION, N_ROUNDS)
        v = load_rows(v_ptrs + n0 * stride_vn, cols < len_k, d_ok, MASKED, EVEN_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# seed and counter_base change every call: no value specialization (it would recompile).
@triton.jit(do_not_specialize=["seed", "counter_base"])
def _forward_kernel(
    Q, K, V, Out, Lse, cu_seqlens, seed, counter_base,     # the arguments that change per call
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_lse_b, stride_lse_h,
    seqlen_q, seqlen_k, heads_q, group_size, window_left, window_right,
    qk_scale, counters_per_row, drop_threshold, drop_rescale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPPER: tl.constexpr, LOWER: tl.constexpr, DROPOUT: tl.constexpr, VARLEN: tl.constexpr,
    PRECISION: tl.constexpr, N_ROUNDS: tl.constexpr, SEED_IN_MEMORY: tl.constexpr = False,
):
    if SEED_IN_MEMORY:      # seed is then the address of a seed drawn on the device (_philox.py)
        seed = tl.load(seed)
    # Reverse order: with causal masking the last query blocks do the most work; start them first.
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    head_k = head // group_size
    start, len_q, len_k = sequence_bounds(cu_seqlens, batch, seqlen_q, seqlen_k, VARLEN)
    m0 = block_m * BLOCK_M
    if m0 >= len_q:
        return
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    batch64 = batch.to(tl.int64)
    start64 = start.to(tl.int64)
    q_base = Q + batch64 * stride_qb + head.to(tl.int64) * stride_qh + (start64 + m0) * stride_qn
    k_base = K + batch64 * stride_kb + head_k.to(tl.int64) * stride_kh + start64 * stride_kn
    v_base = V + batch64 * stride_vb + head_k.to(tl.int64) * stride_vh + start64 * stride_vn

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m                      # query index inside the sequence
    row_ok = rows < len_q
    d_ok = offs_d < HEAD_DIM
    q = load_rows(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], row_ok, d_ok, True, EVEN_D)
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]

    # The band query i sees, aligned bottom-right: i + lower <= j <= i + upper (see _tiles.py).
    upper = len_k - len_q + window_right
    lower = len_k - len_q - window_left
    pair_counters = pair_counter_base(
        counter_base, head_first_pair(batch64 * heads_q + head, seqlen_q) + m0 // 2, counters_per_row,
        BLOCK_M)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)   # running row max (scaled, base 2)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)                 # running softmax denominator
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    keys_start, full_start, full_end, keys_end = key_block_ranges(m0, len_k, upper, lower, BLOCK_M,
                                                                  BLOCK_N, UPPER, LOWER)
    if LOWER:
        acc, l_i, m_i = _attend_key_blocks(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, keys_start, full_start, rows, offs_n,
            d_ok, len_k, upper, lower, qk_scale, seed, pair_counters, drop_threshold, BLOCK_M,
            BLOCK_N, EVEN_D, True, UPPER, LOWER, DROPOUT, PRECISION, N_ROUNDS)
    acc, l_i, m_i = _attend_key_blocks(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, full_start, full_end, rows, offs_n,
        d_ok, len_k, upper, lower, qk_scale, seed, pair_counters, drop_threshold, BLOCK_M,
        BLOCK_N, EVEN_D, False, UPPER, LOWER, DROPOUT, PRECISION, N_ROUNDS)
    acc, l_i, m_i = _attend_key_blocks(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, full_end, keys_end, rows, offs_n,
        d_ok, len_k, upper, lower, qk_scale, seed, pair_counters, drop_threshold, BLOCK_M,
        BLOCK_N, EVEN_D, True, UPPER, LOWER, DROPOUT, PRECISION, N_ROUNDS)

    acc, lse = normalized_rows(acc, l_i, m_i, drop_rescale, DROPOUT)
    o_base = Out + batch64 * stride_ob + head.to(tl.int64) * stride_oh + (start64 + m0) * stride_on
    store_rows(o_base + offs_m[:, None] * stride_on + offs_d[None, :], acc.to(Out.dtype.element_ty),
               row_ok, d_ok, EVEN_D)
    tl.store(Lse + batch64 * stride_lse_b + head.to(tl.int64) * stride_lse_h + start + rows, lse,
             mask=row_ok)


FORWARD = DirectLauncher(_forward_kernel)
FORWARD_TMA = DirectLauncher(_forward_tma._forward_tma_kernel)
FORWARD_GLUON = DirectLauncher(_forward_gluon._forward_gluon_kernel)
FORWARD_PINGPONG = DirectLauncher(_forward_pingpong._forward_pingpong_kernel)
# The ping-pong forward's schedule options (_pingpong_blocks.key_blocks' SCHEDULE bits; 0 is the
# measured default): 1, with dropout the keep-mask drawn while the products run; 2, the softmax step
# in a loop of its own, so that P.V runs under it. Measured with dropout on an H100 (v43): 1 lost
# (+2 to +11 %), 2 was level or behind except at 192 x 64 x 3; without dropout not yet measured.
PINGPONG_SCHEDULE = 0


def lse_shape(geometry: Geometry, total_tokens: int) -> tuple[int, ...]:
    """(batch, heads, seqlen) for padded input; (heads, total_tokens) for packed input."""
    if geometry.varlen:
        return (geometry.heads_q, total_tokens)
    return (geometry.batch, geometry.heads_q, geometry.seqlen_q)


def lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def new_outputs(q: torch.Tensor, geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialized ``(out, lse)``: out contiguous in q's shape, lse float32."""
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(lse_shape(geometry, q.shape[0]), dtype=torch.float32, device=q.device))


def launch_config(q, k, v, out, lse, geometry: Geometry, softmax_scale: float, causal: bool,
                  dropout_p: float, tiles: Tiles | None = None, window: Window = NO_WINDOW):
    """``(launcher, grid, static arguments, constexprs and options)`` of the forward launch: the
    TMA, Gluon or ping-pong kernel where the tiles ask for it and the call qualifies, else the
    portable one; all but the leading per-call arguments (q, k, v, out, lse, cu_seqlens, seed,
    counter base), which is fixed by the tensors' shapes and strides, the dtype and the options."""
    chosen_by_caller = tiles is not None
    tiles = tiles or default_tiles(q, k, v, geometry, causal, dropout_p, window)
    # default_tiles only returns Hopper tiles for calls it checked; a caller's are checked here.
    if tiles.pingpong and chosen_by_caller and not _pingpong_takes(q, k, v, geometry, causal,
                                                                   dropout_p, window, tiles):
        tiles = forward_tiles(geometry.head_dim, q.device, q.dtype)
    tma = tiles.tma and (not chosen_by_caller or _hopper.supported((q, k, v), geometry.varlen))
    gluon = tiles.gluon and (not chosen_by_caller or _gluon_takes(q, k, v, geometry, causal,
                                                                 dropout_p, window, tiles))
    grid = (triton.cdiv(geometry.seqlen_q, tiles.block_m), geometry.heads_q, geometry.batch)
    static = (
        *batched_strides(q, geometry.varlen), *batched_strides(k, geometry.varlen),
        *batched_strides(v, geometry.varlen), *batched_strides(out, geometry.varlen),
        *lse_strides(lse, geometry.varlen),
        geometry.seqlen_q, geometry.seqlen_k, geometry.heads_q, geometry.group_size,
        *band_offsets(causal, window), softmax_scale * LOG2E, counters_per_row(geometry.seqlen_k),
        drop_threshold(dropout_p), drop_rescale(dropout_p))
    options = dict(
        HEAD_DIM=geometry.head_dim, BLOCK_D=geometry.block_d,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        **band_flags(causal, window), DROPOUT=dropout_p > 0, VARLEN=geometry.varlen,
        PRECISION=dot_precision(q.dtype), N_ROUNDS=PHILOX_ROUNDS,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if tma:
        options["MASKED"] = _hopper.masked(causal, window, geometry.seqlen_k, tiles.block_n)
        return FORWARD_TMA, grid, static, options
    if tiles.pingpong:
        # Persistent: one program per SM (or per tile, if fewer), each walking its tiles.
        programs = min(grid[0] * grid[1] * grid[2], multiprocessors(q.device))
        options.update(KV_STAGES=tiles.num_stages, HEAD_MAJOR=tiles.head_major)
        if PINGPONG_SCHEDULE:
            options["SCHEDULE"] = PINGPONG_SCHEDULE
        return FORWARD_PINGPONG, (programs,), (*static, geometry.batch), options
    if gluon:
        options["KV_STAGES"] = tiles.num_stages
        return FORWARD_GLUON, grid, static, options
    return FORWARD, grid, static, options


def _pingpong_takes(q, k, v, geometry: Geometry, causal: bool, dropout_p: float, window: Window,
                    tiles: Tiles) -> bool:
    return _hopper.pingpong_supported((q, k, v), geometry.varlen, causal, window, dropout_p,
                                      geometry.seqlen_q, geometry.seqlen_k, geometry.head_dim,
                                      tiles.block_n)


def multiprocessors(device: torch.device) -> int:
    """The device's SM count (the persistent kernel's program count), asked once per device."""
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _gluon_takes(q, k, v, geometry: Geometry, causal: bool, dropout_p: float, window: Window,
                 tiles: Tiles) -> bool:
    return _hopper.gluon_supported((q, k, v), geometry.varlen, causal, window, dropout_p,
                                   geometry.seqlen_q, geometry.seqlen_k, geometry.head_dim,
                                   tiles.block_n)


def default_tiles(q, k, v, geometry: Geometry, causal: bool, dropout_p: float,
                  window: Window) -> Tiles:
    """The fastest measured forward that takes the call: the ping-pong kernel's tiles where they
    were measured fastest (``pingpong_forward_tiles``: long enough calls) and the
    call qualifies (the Gluon kernel's calls, each tensor readable by one descriptor), the Gluon
    kernel's where they were (``gluon_forward_tiles``) and the call qualifies (sm_90, no window,
    whole key blocks, with the causal mask as many queries as keys), the TMA kernel's (no band or
    dropout, whole key blocks), else the portable kernel's tuned tiles."""
    pingpong = pingpong_forward_tiles(geometry.head_dim, q.device, q.dtype, causal, dropout_p > 0,
                                      geometry.seqlen_q, geometry.seqlen_k)
    if pingpong is not None and _pingpong_takes(q, k, v, geometry, causal, dropout_p, window,
                                                pingpong):
        return pingpong
    gluon = gluon_forward_tiles(geometry.head_dim, q.device, q.dtype, causal, dropout_p > 0)
    if gluon is not None and _gluon_takes(q, k, v, geometry, causal, dropout_p, window, gluon):
        return gluon
    tma = tma_forward_tiles(geometry.head_dim, q.device, q.dtype)
    if (tma is not None and dropout_p == 0
            and not _hopper.masked(causal, window, geometry.seqlen_k, tma.block_n)
            and _hopper.supported((q, k, v), geometry.varlen)):
        return tma
    return forward_tiles(geometry.head_dim, q.device, q.dtype)


def launch_into(out, lse, q, k, v, cu_seqlens, geometry: Geometry, softmax_scale: float,
                causal: bool, dropout_p: float, seed: int, offset: int, tiles: Tiles | None = None,
                window: Window = NO_WINDOW):
    """Launch the forward kernel writing into ``out`` and ``lse``. Returns ``(bound kernel or None,
    3-D grid, static arguments)``: the same for every call with these shapes, strides and options,
    so a launch plan (``_eager_plan.py``) can repeat the launch with new addresses."""
    launcher, grid, static, options = launch_config(q, k, v, out, lse, geometry, softmax_scale,
                                                    causal, dropout_p, tiles, window)
    seed_argument, counter_base, in_memory = seed_arguments(seed, offset)
    # Only with dropout. The portable and Gluon kernels take a device seed; the TMA kernel, which
    # no default chooses with dropout, does not.
    if in_memory:
        options["SEED_IN_MEMORY"] = True
    arguments = (q, k, v, out, lse, cu_seqlens, seed_argument, counter_base, *static)
    if launcher is not FORWARD_PINGPONG:
        bound = _hopper.launch(launcher, FORWARD, grid, arguments, options)
        return bound, grid3(grid), static
    # The persistent kernel has its own grid and one more argument: if it cannot compile, the
    # portable kernel runs the call with its own launch (derived only then).
    def portable_config():
        return launch_config(q, k, v, out, lse, geometry, softmax_scale, causal, dropout_p,
                             forward_tiles(geometry.head_dim, q.device, q.dtype), window)[1:]

    def portable_launch():
        portable_grid, portable_static, portable_options = portable_config()
        return portable_grid, (*arguments[:8], *portable_static), portable_options
    bound = _hopper.launch(launcher, FORWARD, grid, arguments, options, portable_launch)
    if _hopper.fell_back(launcher, options):
        portable_grid, portable_static, _ = portable_config()
        return bound, grid3(portable_grid), portable_static
    return bound, grid3(grid), static


def forward(q, k, v, cu_seqlens, geometry: Geometry, softmax_scale: float, causal: bool,
            dropout_p: float, seed: int, offset: int, tiles: Tiles | None = None,
            window: Window = NO_WINDOW):
    """Launch the forward kernel; returns ``(out, lse)`` with ``out`` contiguous in q's shape.

    ``tiles`` overrides the tuned tile sizes (for tuning scripts)."""
    out, lse = new_outputs(q, geometry)
    launch_into(out, lse, q, k, v, cu_seqlens, geometry, softmax_scale, causal, dropout_p, seed,
                offset, tiles, window)
    return out, lse
