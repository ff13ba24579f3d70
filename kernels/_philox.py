"""Dropout randomness for the attention kernels: counter-based Philox, replayable from (seed, offset).

The forward never stores a dropout mask. It draws a ``(seed, offset)`` pair from PyTorch's generator
for the device (advancing the generator's offset so the next random op sees fresh numbers), and every
kernel that needs the mask regenerates it from that pair. The element ``(b, h, i, j)`` of the
``(batch, heads_q, seqlen_q, seqlen_k)`` attention matrix uses Philox counter

    offset // 4  +  ((b * heads_q + h) * seqlen_q + i) * ceil(seqlen_k / 4)  +  j // 4

and takes output ``j % 4`` of the four 32-bit words that counter produces: one Philox call serves four
neighbouring columns. All counter arithmetic is 64-bit (B·H·N² overflows 32 bits at long context).
An element is kept when the top 24 bits of its word are >= ``round(dropout_p * 2**24)``.
"""

import torch
import triton
import triton.language as tl

# Philox4x32 with 7 rounds passes BigCrush (Salmon et al., "Parallel random numbers: as easy as
# 1, 2, 3", SC'11); 10 is Triton's conservative default. Each round costs ALU time in the hot loop.
PHILOX_ROUNDS = 7
_THRESHOLD_BITS = 24


@triton.jit
def dropout_keep_tile(seed, counter_base, rows, col_start, counters_per_row, drop_threshold,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_ROUNDS: tl.constexpr):
    """Keep-mask of one (BLOCK_M, BLOCK_N) tile; ``rows`` are global int64 row ids (BLOCK_M,).

    ``col_start`` must be a multiple of 4 (tiles always start on one).
    """
    groups = col_start // 4 + tl.arange(0, BLOCK_N // 4)
    counters = counter_base + rows[:, None] * counters_per_row + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters, N_ROUNDS)
    # join(join(r0, r2), join(r1, r3)) flattens its two new minor axes to r0, r1, r2, r3 in order,
    # so column 4g + c holds word c of counter g.
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    return (words >> (32 - _THRESHOLD_BITS)).to(tl.int32) >= drop_threshold


def drop_threshold(dropout_p: float) -> int:
    """Integer threshold on a 24-bit uniform word: kept with probability ``1 - dropout_p``."""
    return int(round(dropout_p * (1 << _THRESHOLD_BITS)))


def philox_counters(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int) -> int:
    """How many Philox counters one attention call consumes."""
    return batch * heads_q * seqlen_q * triton.cdiv(seqlen_k, 4)


def next_seed_offset(device: torch.device, counters: int) -> tuple[int, int]:
    """Take ``(seed, offset)`` from the device's default generator and advance it past this call.

    On CUDA this reads the generator's seed and Philox offset and moves the offset on (no device sync),
    so ``torch.manual_seed`` governs the mask and ``torch.utils.checkpoint``, which saves and restores
    the generator state, replays it. The CPU generator (Mersenne Twister) has no offset: there a fresh
    seed is drawn from it, which checkpointing also saves and restores.
    """
    if device.type == "cuda":
        generator = torch.cuda.default_generators[device.index if device.index is not None
                                                  else torch.cuda.current_device()]
        seed = generator.initial_seed() & (2**63 - 1)
        offset = generator.get_offset()
        generator.set_offset(offset + 4 * counters)
        return seed, offset
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    return seed, 0
