"""Test-only: materialize the dropout keep-mask a call used, from its seed and offset."""

import torch
import triton
import triton.language as tl

from ._launch import Geometry
from ._philox import (PHILOX_ROUNDS, counters_per_row, dropout_keep_tile, kernel_counter_base,
                      head_first_pair, kernel_seed, pair_counter_base)


@triton.jit(do_not_specialize=["seed", "counter_base"])
def _keep_mask_kernel(Mask, seqlen_q, seqlen_k, seed, counter_base, counters_per_row,
                      drop_threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      N_ROUNDS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n0 = tl.program_id(1) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    batch_head = tl.program_id(2).to(tl.int64)      # b * heads_q + h
    first_pair = head_first_pair(batch_head, seqlen_q) + tl.program_id(0) * (BLOCK_M // 2)
    keep = dropout_keep_tile(seed, pair_counter_base(counter_base, first_pair, counters_per_row,
                                                     BLOCK_M),
                             n0, drop_threshold, BLOCK_M, BLOCK_N, N_ROUNDS)
    ptrs = Mask + (batch_head * seqlen_q + rows)[:, None] * seqlen_k + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows < seqlen_q)[:, None] & (cols < seqlen_k)[None, :])


def keep_mask(geometry: Geometry, seed: int, offset: int, drop_threshold: int,
              device: torch.device) -> torch.Tensor:
    """Boolean (batch, heads_q, seqlen_q, seqlen_k): the mask the kernels regenerate tile by tile."""
    shape = (geometry.batch, geometry.heads_q, geometry.seqlen_q, geometry.seqlen_k)
    mask = torch.empty(shape, dtype=torch.int8, device=device)
    block = 32
    grid = (triton.cdiv(geometry.seqlen_q, block), triton.cdiv(geometry.seqlen_k, block),
            geometry.batch * geometry.heads_q)
    _keep_mask_kernel[grid](mask, geometry.seqlen_q, geometry.seqlen_k, kernel_seed(seed),
                            kernel_counter_base(offset),
                            counters_per_row(geometry.seqlen_k), drop_threshold,
                            BLOCK_M=block, BLOCK_N=block,
                            N_ROUNDS=PHILOX_ROUNDS)
    return mask.bool()
