"""Pieces the Gluon kernels for sm_90 (_forward_gluon.py, _dq_gluon.py, _dkdv_gluon.py) share."""

from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma


@gluon.jit
def head_descriptor(tensor, batch, stride_b, head, stride_h, rows, stride_row,
                    BLOCK_ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
    """TMA descriptor of one (sequence, head) slice of a (batch, rows, heads, HEAD_DIM) tensor, read
    in BLOCK_ROWS x HEAD_DIM boxes (rows past the end arrive as zeros); its ``layout`` is the shared
    memory layout those boxes land in."""
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_ROWS, HEAD_DIM],
                                                                tensor.dtype.element_ty)
    return tma.make_tensor_descriptor(tensor + batch.to(gl.int64) * stride_b
                                      + head.to(gl.int64) * stride_h,
                                      [rows, HEAD_DIM], [stride_row, 1], [BLOCK_ROWS, HEAD_DIM],
                                      layout)


@gluon.jit
def heavy_first(tile, n_blocks, n_pairs, GROUP: gl.constexpr):
    """(block, pair) of the ``tile``-th of ``n_blocks`` x ``n_pairs`` programs (a pair: one batch
    entry's head) when the pairs are taken GROUP at a time and, within a group, block 0 of each
    pair comes first, then block 1, and so on.

    Why: under the causal mask a key block's backward program has less work the higher its
    block; run pair by pair, the grid's last programs include the heaviest blocks of the last
    pairs, and the SMs wait on them. Heaviest first, the last wave is the lightest. GROUP bounds
    how many pairs' Q and dO the programs running at once read: all pairs in one group (every
    head's block 0 first) ran the pass 20 % slower (L2; attention_notes v28)."""
    per_group = n_blocks * GROUP
    group = tile // per_group
    size = gl.minimum(n_pairs - group * GROUP, GROUP)
    rest = tile - group * per_group
    return rest // size, group * GROUP + rest % size


@gluon.jit
def alternate_rounds(tile, n_tiles):
    """The tile a persistent program takes at loop index ``tile`` (program_id + k x programs) when
    every other whole round of the grid runs backwards; a partial last round runs forwards.

    Why: where tiles of one round have unequal work in a fixed order (under the causal mask, the
    heavy blocks first), striding by the grid size would give the same programs the heavy end of
    every round; reversed, a program that took a heavy tile in one round takes a light one in the
    next. (dK/dV persistent pass, whole backward against striding alone: -4 to -20 % at 1K-8K,
    attention_notes v28.)"""
    programs = gl.num_programs(0)
    round = tile // programs
    if (round % 2 == 1) and ((round + 1) * programs <= n_tiles):
        tile = round * programs + programs - 1 - tile % programs
    return tile


@gluon.jit
def load_block_pair(a_desc, b_desc, a_smem, b_smem, bars, index, row, n_items,
                    STAGES: gl.constexpr):
    """Start the TMA copies of a program's ``index``-th block of two tensors (Q and dO, or K and V;
    rows from ``row``), if it exists (``index < n_items``), into stage ``index % STAGES`` of their
    shared buffers; one barrier counts both copies."""
    stage = index % STAGES
    exists = index < n_items
    mbarrier.expect(bars.index(stage), a_desc.block_type.nbytes + b_desc.block_type.nbytes,
                    pred=exists)
    tma.async_copy_global_to_shared(a_desc, [row, 0], bars.index(stage), a_smem.index(stage),
                                    pred=exists)
    tma.async_copy_global_to_shared(b_desc, [row, 0], bars.index(stage), b_smem.index(stage),
                                    pred=exists)


@builtin
def tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """global[the box at ``coord``] += shared tile ``src`` (same layout as the descriptor's), by the
    copy engine (``cp.reduce.async.bulk.tensor ... .add``): one instruction from one thread for a
    whole tile, instead of an atomic per element or four. It completes like a TMA store, in bulk
    groups: ``tma.store_wait(n)`` returns once at most n are still reading shared memory.
    Triton 3.6's Gluon has the operation in its builder but no wrapper for it."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle,
                                              coord, src.handle)
