"""Backward pass launches: the dQ and dK/dV passes (``_backward_kernels.py``, the algorithm and its
fused single-pass form) with their tuned tiles, strides and scalars, the Gluon passes for sm_90
(``_dq_gluon.py``, ``_dkdv_gluon.py``, ``_dkdv_warp_specialized.py``, ``_dkdv_ws_persistent.py``)
where a call qualifies, and the fused pass's float32 dQ buffer. ``backward`` is the entry point;
``launch_into`` also returns what a launch plan (``_eager_plan.py``) needs to repeat the launches.
"""

import dataclasses

import torch
import triton

from . import _dkdv_gluon, _dkdv_warp_specialized, _dkdv_ws_persistent, _dq_gluon, _hopper
from ._backward_kernels import _dkdv_kernel, _dq_kernel
from ._direct_launch import DirectLauncher, grid3
from ._finish_dq import finish_dq_kernel
from ._forward import LOG2E, lse_strides, multiprocessors
from ._launch import (NO_WINDOW, Geometry, Tiles, Window, band_flags, band_offsets, batched_strides,
                      dot_precision)
from ._tile_rules import dkdv_tiles, dq_tiles
from ._philox import (PHILOX_ROUNDS, counters_per_row, drop_rescale, drop_threshold,
                      seed_arguments)

# How the dK/dV pass, whose tiles are transposed against the forward's, applies the dropout mask:
#   "untransposed": compute that tile in the forward's orientation (each thread generates its own
#                   counters) and pass P and dS to the transposed products through shared memory;
#   "broadcast":    keep the transposed tiles, each thread recomputes every counter it touches.
# (A third way, each counter once and the boolean tile shuffled, measured slower than both.)
# See docs/results/attention_notes.md for the timings.
DKDV_MASK_LAYOUT = "untransposed"


def dkdv_mask_layout(tiles: Tiles, device: torch.device) -> str:
    """The dK/dV pass's dropout mask layout for these tiles. Compiled for a GPU, the untransposed
    layout gives a wrong dK with 16 x 128 tiles (3.7-4 % relative error against float32 with the
    causal mask, 1.2 % without, bf16 and fp16, H200, Triton 3.6; dV and every other measured
    tiling, 16 x 64 included, are exact; attention_notes.md, v13) while the interpreter computes it
    exactly, so a code-generation fault rather than the algorithm: such tiles take the broadcast
    layout, which is exact there."""
    if device.type == "cuda" and tiles.block_m < 32 and tiles.block_n > 64:
        return "broadcast"
    return DKDV_MASK_LAYOUT


DQ = DirectLauncher(_dq_kernel)
DKDV = DirectLauncher(_dkdv_kernel)
DKDV_GLUON = DirectLauncher(_dkdv_gluon._dkdv_gluon_kernel)
DQ_GLUON = DirectLauncher(_dq_gluon._dq_gluon_kernel)
DKDV_WARP_SPECIALIZED = DirectLauncher(_dkdv_warp_specialized._dkdv_warp_specialized_kernel)
DKDV_WS_PERSISTENT = DirectLauncher(_dkdv_ws_persistent._dkdv_ws_persistent_kernel)


def contiguous_batched_strides(shape, varlen: bool) -> tuple[int, int, int]:
    """``batched_strides`` of a contiguous tensor of ``shape`` (batch?, tokens, heads, head_dim)."""
    heads, head_dim = shape[-2], shape[-1]
    per_batch = 0 if varlen else shape[1] * heads * head_dim
    return per_batch, heads * head_dim, head_dim


def new_gradients(q, k, v, lse):
    """Uninitialized ``(delta, dq, dk, dv)``: the gradients contiguous in q's, k's and v's shapes."""
    return (torch.empty_like(lse), torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def launch_configs(grad_out, q, k, v, out, lse, dq, dk, dv, geometry: Geometry,
                   softmax_scale: float, causal: bool, dropout_p: float,
                   tiles: tuple[Tiles, Tiles] | None = None, window: Window = NO_WINDOW):
    """``(launcher, grid, static arguments, constexprs and options)`` of the dQ launch, then of
    the dK/dV launch: everything but the leading per-call arguments (tensors, cu_seqlens, seed,
    counter base), which is fixed by the tensors' shapes and strides, the dtype and the options."""
    varlen = geometry.varlen
    dropout = dropout_p > 0
    deterministic = torch.are_deterministic_algorithms_enabled()
    # The persistent pass reads each tensor through one descriptor of (batch x seqlen) rows (no
    # Gluon pass takes packed sequences).
    one_matrix = not varlen and all(_hopper.rows_of_one_matrix(t) for t in (q, k, v, grad_out))
    kv_tiles, q_tiles = tiles or (dkdv_tiles(geometry.head_dim, q.device, q.dtype, causal, dropout,
                                             seqlen=geometry.seqlen_q, deterministic=deterministic,
                                             persistent=one_matrix),
                                  dq_tiles(geometry.head_dim, q.device, q.dtype, dropout))
    if kv_tiles.persistent and not one_matrix:     # a caller's tiles: the per-key-block grid
        kv_tiles = dataclasses.replace(kv_tiles, persistent=False, kv_buffers=1)
    # The Gluon passes read q, k, v and the output gradient by TMA.
    gluon_device = ((q_tiles.gluon or kv_tiles.gluon)
                    and _hopper.gluon_device((q, k, v, grad_out), varlen))
    call = (causal, window, dropout_p, geometry.seqlen_q, geometry.seqlen_k, geometry.head_dim)
    gluon_dkdv = kv_tiles.gluon and gluon_device and _hopper.gluon_dkdv_call(
        *call, geometry.group_size, kv_tiles.block_m, kv_tiles.block_n)
    if tiles is None and kv_tiles.gluon and not gluon_dkdv:
        # A call the Gluon pass does not take runs the portable pass's own tiles (with dropout
        # they differ from the Gluon pass's).
        kv_tiles = dkdv_tiles(geometry.head_dim, q.device, q.dtype, causal, dropout, hopper=False,
                              seqlen=geometry.seqlen_q, deterministic=deterministic)
    if tiles is None and kv_tiles.fused and deterministic:
        # The fused pass sums dQ by atomic adds in whatever order the blocks finish: not bitwise
        # reproducible. Under torch.use_deterministic_algorithms the default is the two passes
        # (dkdv_tiles gives their tiles; this holds whatever the tile rule says).
        kv_tiles = dataclasses.replace(kv_tiles, fused=False, warp_specialized=False,
                                       persistent=False, kv_buffers=1)
    inputs = (*batched_strides(q, varlen), *batched_strides(k, varlen), *batched_strides(v, varlen),
              *batched_strides(grad_out, varlen))
    scalars = (geometry.seqlen_q, geometry.seqlen_k, geometry.heads_q, geometry.group_size,
               *band_offsets(causal, window), softmax_scale, softmax_scale * LOG2E, counters_per_row(geometry.seqlen_k),
               drop_threshold(dropout_p), drop_rescale(dropout_p))
    flags = dict(HEAD_DIM=geometry.head_dim, BLOCK_D=geometry.block_d, VARLEN=varlen,
                 **band_flags(causal, window), DROPOUT=dropout, PRECISION=dot_precision(q.dtype),
                 N_ROUNDS=PHILOX_ROUNDS)
    dq_config = (
        (triton.cdiv(geometry.seqlen_q, q_tiles.block_m), geometry.heads_q, geometry.batch),
        (*inputs, *batched_strides(out, varlen), *batched_strides(dq, varlen),
         *lse_strides(lse, varlen), *scalars),
        dict(BLOCK_M=q_tiles.block_m, BLOCK_N=q_tiles.block_n, num_warps=q_tiles.num_warps,
             num_stages=q_tiles.num_stages, **flags))
    dkdv_config = (
        (triton.cdiv(geometry.seqlen_k, kv_tiles.block_n), geometry.heads_k, geometry.batch),
        # The fused pass's float32 dQ accumulator: dQ's shape, contiguous (dQ itself may be a
        # strided view, e.g. a slice of a packed qkv gradient).
        (*inputs, *batched_strides(dk, varlen), *batched_strides(dv, varlen),
         *contiguous_batched_strides(dq.shape, varlen), *lse_strides(lse, varlen), *scalars),
        dict(BLOCK_M=kv_tiles.block_m, BLOCK_N=kv_tiles.block_n,
             MASK_LAYOUT=dkdv_mask_layout(kv_tiles, q.device), num_warps=kv_tiles.num_warps,
             num_stages=kv_tiles.num_stages, **flags))
    if kv_tiles.fused:
        dq_config[2]["DELTA_ONLY"] = True
        dkdv_config[2]["ACCUMULATE_DQ"] = True
    dq_launcher, dkdv_launcher = DQ, DKDV
    # The fused backward's delta-only pass is the portable kernel's (the Gluon dQ has no such mode).
    if (gluon_device and q_tiles.gluon and not kv_tiles.fused
            and _hopper.gluon_dq_call(*call, q_tiles.block_m, q_tiles.block_n)):
        dq_launcher = DQ_GLUON
        dq_config[2]["STAGES"] = q_tiles.num_stages
    if gluon_dkdv:
        dkdv_launcher = DKDV_WARP_SPECIALIZED if kv_tiles.warp_specialized else DKDV_GLUON
        dkdv_config[2]["STAGES"] = kv_tiles.num_stages
        if kv_tiles.mask_partition and dropout:
            dkdv_config[2]["MASK_PARTITION"] = True
        if kv_tiles.warp_specialized and not kv_tiles.persistent and causal:
            dkdv_config[2]["ORDER_GROUP"] = _dkdv_warp_specialized.causal_order_group(
                geometry.seqlen_k)
        if (kv_tiles.warp_specialized and not kv_tiles.register_grads
                and key_gradients_by_tma(dk, dv, dkdv_config[2], kv_tiles.persistent)):
            dkdv_config[2]["TMA_GRADS"] = True
        if kv_tiles.persistent:
            # One program per SM (or per tile, if fewer), each walking its tiles; one more
            # argument, the batch size.
            grid, static, options = dkdv_config
            programs = persistent_programs(grid[0], grid[0] * grid[1] * grid[2],
                                           multiprocessors(q.device), causal)
            dkdv_launcher = DKDV_WS_PERSISTENT
            dkdv_config = ((programs,), (*static, geometry.batch),
                           {**options, "KV_BUFFERS": kv_tiles.kv_buffers})
    return (dq_launcher, *dq_config), (dkdv_launcher, *dkdv_config)


def key_gradients_by_tma(dk, dv, options: dict, persistent: bool) -> bool:
    """Whether the warp-specialized pass with these options stores dK and dV by TMA through
    shared memory (``_dkdv_ws_setup.store_key_gradients``), as it does unless its tiles say
    ``register_grads``: where their staging fits (``key_gradient_staging_fits``) and both are
    readable by TMA (16-byte aligned, unit column stride), in the persistent grid each as rows of
    one matrix (one descriptor per tensor). Measured in attention_notes v37."""
    if not key_gradient_staging_fits(options):
        return False
    if persistent and not all(_hopper.rows_of_one_matrix(t) for t in (dk, dv)):
        return False
    return _hopper.supported((dk, dv), False)


def key_gradient_staging_fits(options: dict) -> bool:
    """Whether the P slots, doubled to stage dK and dV (16 KB more), fit shared memory beside the
    pass's other tiles: not beside the mask partition's at head dim 128 (229,888 bytes without
    the doubling, of 232,448)."""
    return not (options.get("MASK_PARTITION") and options["HEAD_DIM"] == 128)


def persistent_programs(key_blocks: int, tiles: int, sms: int, causal: bool) -> int:
    """Programs of the persistent dK/dV grid: one per SM, or one per tile if fewer.

    With the causal mask the count is rounded down to a multiple of the key blocks per head
    (where at least one head's worth fits). Every round of the grid then covers whole heads, so
    with every other round reversed (``_dkdv_ws_persistent._tile``) each program takes key
    block j in one round and block key_blocks - 1 - j in the next: the same work per pair of
    rounds at any head count. With all 132 SMs of an H100 or H200 (not a multiple of 32 key
    blocks, a 4K head), a program's key block shifts from round to round and the reversal pairs
    heavy tiles with light ones only on average: a static simulation puts the busiest program
    20 / 28 % above the mean at 12 heads and 4K / 8K tokens, against 3 % (the 4 idle SMs) with
    the rounded count. Measured (attention_notes v29, whole backward, 16K tokens): at 12 heads
    and head dim 64 the rounded grid took 0.664 / 1.21 ms at 4K / 8K against 0.76 / 1.45 on all
    132 SMs; at 32 heads the two were level."""
    programs = min(tiles, sms)
    if causal and key_blocks <= programs:
        programs -= programs % key_blocks
    return programs


def launch_into(delta, dq, dk, dv, grad_out, q, k, v, out, lse, cu_seqlens, geometry: Geometry,
                softmax_scale: float, causal: bool, dropout_p: float, seed, offset: int,
                tiles: tuple[Tiles, Tiles] | None = None, window: Window = NO_WINDOW):
    """Launch the dQ pass, then the dK/dV pass, writing into ``delta``, ``dq``, ``dk``, ``dv``.
    Returns, per pass, ``(bound kernel or None, 3-D grid, static arguments)``: the same for every
    call with these shapes, strides and options (see ``_forward.launch_into``); then the fused
    backward's dQ scale (None for two passes): its dK/dV pass adds unscaled dQ into a float32
    buffer (``new_dq_accumulator``), which ``finish_dq`` scales into dQ."""
    ((dq_launcher, dq_grid, dq_static, dq_options),
     (dkdv_launcher, dkdv_grid, dkdv_static, dkdv_options)) = launch_configs(
        grad_out, q, k, v, out, lse, dq, dk, dv, geometry, softmax_scale, causal, dropout_p, tiles,
        window)
    fused = dkdv_options.get("ACCUMULATE_DQ", False)
    # The fused dK/dV pass adds dQ here; the two-pass one does not read it.
    dq_accumulator = new_dq_accumulator(dq) if fused else dq
    seed, counter_base, in_memory = seed_arguments(seed, offset)
    if in_memory:           # only with dropout: the portable passes and the Gluon dK/dV take it
        dq_options["SEED_IN_MEMORY"] = dkdv_options["SEED_IN_MEMORY"] = True
    # dQ first: it also writes delta, which dK/dV reads.
    dq_arguments = (q, k, v, grad_out, out, lse, delta, dq, cu_seqlens, seed, counter_base,
                    *dq_static)
    dkdv_arguments = (q, k, v, grad_out, lse, delta, dk, dv, dq_accumulator, cu_seqlens, seed,
                      counter_base, *dkdv_static)
    dq_bound = _hopper.launch(dq_launcher, DQ, dq_grid, dq_arguments, dq_options)
    dkdv_bound, dkdv_grid, dkdv_static = _launch_dkdv(dkdv_launcher, dkdv_grid, dkdv_arguments,
                                                      dkdv_static, dkdv_options, geometry)
    dq_scale = None
    if fused:
        # The scale the dQ pass applies in its epilogue: softmax scale, and 1 / (1 - p).
        dq_scale = softmax_scale * (drop_rescale(dropout_p) if dropout_p > 0 else 1.0)
        finish_dq(dq_accumulator, dq_scale, dq)
    return (dq_bound, grid3(dq_grid), dq_static), (dkdv_bound, grid3(dkdv_grid), dkdv_static), dq_scale


def _launch_dkdv(launcher, grid, arguments, static, options: dict, geometry: Geometry):
    """Launch the dK/dV pass; returns ``(bound kernel or None, grid, static arguments)`` of what
    ran. The persistent pass has its own grid and one more argument: if it cannot compile, the
    portable pass runs the call with the per-key-block grid (its fused form, as the dQ pass that
    already ran computed δ alone)."""
    if launcher is not DKDV_WS_PERSISTENT:
        return _hopper.launch(launcher, DKDV, grid, arguments, options), grid, static
    per_key_block = (triton.cdiv(geometry.seqlen_k, options["BLOCK_N"]), geometry.heads_k,
                     geometry.batch)
    portable_options = {name: value for name, value in options.items()
                        if name not in _hopper.HOPPER_ONLY_OPTIONS}

    def portable_launch():
        return per_key_block, arguments[:-1], portable_options
    bound = _hopper.launch(launcher, DKDV, grid, arguments, options, portable_launch)
    if _hopper.fell_back(launcher, options):
        return bound, per_key_block, static[:-1]
    return bound, grid, static


def new_dq_accumulator(dq: torch.Tensor) -> torch.Tensor:
    """The fused pass's dQ buffer: float32 zeros, contiguous in dQ's shape (dQ may be a strided view)."""
    return torch.zeros(dq.shape, dtype=torch.float32, device=dq.device)


# Whether finish_dq runs _finish_dq.py's kernel instead of torch.mul. Same values; through the
# strided dQ of GPT-2's packed q/k/v the kernel's 16-byte stores took 25 µs against torch.mul's
# 45-46 µs a call, 16K tokens × 12 heads × 64 on an H200 (``tune_attention.py --finish-study``).
FINISH_DQ_KERNEL = True


def finish_dq(accumulator: torch.Tensor, scale: float, dq: torch.Tensor,
              kernel: bool | None = None) -> None:
    """dQ = scale · the fused pass's float32 sum, cast into dQ's dtype in one kernel:
    ``torch.mul``, or with ``kernel`` (default ``FINISH_DQ_KERNEL``) ``_finish_dq.py``'s."""
    if FINISH_DQ_KERNEL if kernel is None else kernel:
        finish_dq_kernel(accumulator, scale, dq)
    else:
        torch.mul(accumulator, scale, out=dq)


def backward(grad_out, q, k, v, out, lse, cu_seqlens, geometry: Geometry, softmax_scale: float,
             causal: bool, dropout_p: float, seed: int, offset: int,
             tiles: tuple[Tiles, Tiles] | None = None, window: Window = NO_WINDOW, grads=None):
    """Gradients ``(dq, dk, dv)``, contiguous, in the shapes of q, k and v; or written into
    ``grads`` = (dq, dk, dv), which may be strided views (e.g. slices of one packed qkv gradient).

    ``tiles`` = (dK/dV tiles, dQ tiles) overrides the tuned sizes (for tuning scripts)."""
    delta, dq, dk, dv = (new_gradients(q, k, v, lse) if grads is None
                         else (torch.empty_like(lse), *grads))
    launch_into(delta, dq, dk, dv, grad_out, q, k, v, out, lse, cu_seqlens, geometry,
                softmax_scale, causal, dropout_p, seed, offset, tiles, window)
    return dq, dk, dv
