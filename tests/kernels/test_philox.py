"""A dropout mask does not depend on the tile shape that builds it: every kernel (and the debug
mask) tiles it differently, and all must regenerate the same bits."""

import pytest
import torch
import triton
import triton.language as tl

from kernels._philox import PHILOX_ROUNDS, drop_threshold, dropout_keep_tile, pair_counter_base


@triton.jit
def _tiled_mask(Mask, seed, threshold, col_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                N_ROUNDS: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    n0 = tl.program_id(1) * BLOCK_N
    rows = m0 + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    pair_counters = pair_counter_base(12345, m0 // 2, 1000, BLOCK_M)
    offsets = rows[:, None] * (BLOCK_N * tl.num_programs(1)) + cols[None, :]
    tl.store(Mask + offsets, dropout_keep_tile(seed, pair_counters, col_start + n0, threshold,
                                               BLOCK_M, BLOCK_N, N_ROUNDS).to(tl.int8))


def _mask(block_m, block_n, device):
    """A 64 x 128 mask built from (block_m, block_n) tiles."""
    mask = torch.empty(64, 128, dtype=torch.int8, device=device)
    _tiled_mask[(64 // block_m, 128 // block_n)](mask, 2024, drop_threshold(0.5), 64,
                                                 BLOCK_M=block_m, BLOCK_N=block_n,
                                                 N_ROUNDS=PHILOX_ROUNDS)
    return mask


@pytest.mark.parametrize("block_m,block_n", [(16, 128), (32, 64), (64, 32)])
def test_tile_shapes_agree(block_m, block_n, device):
    mask = _mask(block_m, block_n, device)
    assert torch.equal(mask, _mask(16, 32, device))
    assert 0.4 < mask.float().mean().item() < 0.6
