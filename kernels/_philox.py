"""Dropout randomness for the attention kernels: counter-based Philox, replayable from (seed, offset).

The forward never stores a dropout mask. It draws a ``(seed, offset)`` pair from PyTorch's generator
for the device (advancing the generator's offset so the next random op sees fresh numbers), and every
kernel that needs the mask regenerates it from that pair. The element ``(b, h, i, j)`` of the
``(batch, heads_q, seqlen_q, seqlen_k)`` attention matrix uses Philox counter

    offset // 4  +  ((b * heads_q + h) * seqlen_q + i) * ceil(seqlen_k / 8)  +  j // 8

which yields four 32-bit words, i.e. eight 16-bit halves; column ``j`` takes half ``j % 2`` of word
``(j % 8) // 2``. One Philox call thus serves eight neighbouring columns: Philox is integer work that
competes with the softmax for the ALUs, so this halves the cost of dropout against one word per
column. All counter arithmetic is 64-bit (B·H·N² overflows 32 bits at long context). An element is
kept when its 16-bit half is >= ``round(dropout_p * 2**16)``: the keep probability is exact to
1/65536 (kept values are scaled by the nominal 1/(1 - dropout_p)).
"""

import torch
import triton
import triton.language as tl

# Philox4x32 with 7 rounds passes BigCrush (Salmon et al., "Parallel random numbers: as easy as
# 1, 2, 3", SC'11); 10 is Triton's conservative default. Each round costs ALU time in the hot loop.
PHILOX_ROUNDS = 7
COLUMNS_PER_COUNTER = 8
_THRESHOLD_BITS = 16


@triton.jit
def _kept_halves(word, drop_threshold):
    """Keep decisions of the low and high 16-bit halves of a 32-bit word."""
    return (word & 0xFFFF).to(tl.int32) >= drop_threshold, (word >> 16).to(tl.int32) >= drop_threshold


@triton.jit
def dropout_keep_tile(seed, row_counters, col_start, drop_threshold,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_ROUNDS: tl.constexpr):
    """Keep-mask of one (BLOCK_M, BLOCK_N) tile.

    ``row_counters`` (BLOCK_M,) int64 is each row's first counter (see ``row_counter_base``);
    ``col_start`` must be a multiple of 8 (tiles always start on one).
    """
    counters = row_counters[:, None] + (col_start // 8 + tl.arange(0, BLOCK_N // 8))[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counters, N_ROUNDS)
    lo0, hi0 = _kept_halves(w0, drop_threshold)
    lo1, hi1 = _kept_halves(w1, drop_threshold)
    lo2, hi2 = _kept_halves(w2, drop_threshold)
    lo3, hi3 = _kept_halves(w3, drop_threshold)
    # Three nested joins add minor axes (i, j, k) that flatten to column 4i + 2j + k, holding the
    # k-th operand's j-th operand's i-th operand. Column c must hold half c % 2 of word c // 2.
    # Joining booleans rather than words keeps the final layout change small.
    kept = tl.join(tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3)),
                   tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3)))
    return tl.reshape(kept, (BLOCK_M, BLOCK_N))


@triton.jit
def row_counter_base(counter_base, global_rows, counters_per_row):
    """First Philox counter of each global row ``(b * heads_q + h) * seqlen_q + i`` (int64)."""
    return counter_base + global_rows.to(tl.int64) * counters_per_row


def drop_threshold(dropout_p: float) -> int:
    """Integer threshold on a 16-bit uniform value: kept with probability ``1 - dropout_p``."""
    return int(round(dropout_p * (1 << _THRESHOLD_BITS)))


def counters_per_row(seqlen_k: int) -> int:
    return triton.cdiv(seqlen_k, COLUMNS_PER_COUNTER)


def philox_counters(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int) -> int:
    """How many Philox counters one attention call consumes."""
    return batch * heads_q * seqlen_q * counters_per_row(seqlen_k)


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
