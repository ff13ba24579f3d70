"""The two ways of building a dropout tile (broadcast per thread, compact + shuffle) agree."""

import pytest
import torch
import triton
import triton.language as tl

from kernels._philox import (PHILOX_ROUNDS, dropout_keep_tile, dropout_keep_tile_compact,
                             drop_threshold, row_counter_base)


@triton.jit
def _both_tiles(Broadcast, Compact, seed, threshold, col_start, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, N_ROUNDS: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    row_counters = row_counter_base(12345, rows, 1000)
    offsets = rows[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(Broadcast + offsets, dropout_keep_tile(seed, row_counters, col_start, threshold,
                                                    BLOCK_M, BLOCK_N, N_ROUNDS).to(tl.int8))
    tl.store(Compact + offsets, dropout_keep_tile_compact(seed, row_counters, col_start, threshold,
                                                          BLOCK_M, BLOCK_N, N_ROUNDS).to(tl.int8))


@pytest.mark.parametrize("block_n", [32, 64, 128])
def test_generators_agree(block_n, device):
    broadcast = torch.empty(16, block_n, dtype=torch.int8, device=device)
    compact = torch.empty_like(broadcast)
    _both_tiles[(1,)](broadcast, compact, 2024, drop_threshold(0.5), 64, BLOCK_M=16,
                      BLOCK_N=block_n, N_ROUNDS=PHILOX_ROUNDS)
    assert torch.equal(broadcast, compact)
    assert 0.3 < broadcast.float().mean().item() < 0.7
