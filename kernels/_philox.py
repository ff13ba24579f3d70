"""Dropout randomness for the attention kernels: counter-based Philox, replayable from (seed, offset).

The forward never stores a dropout mask. It draws a ``(seed, offset)`` pair from PyTorch's generator
for the device (advancing the generator's offset so the next random op sees fresh numbers), and every
kernel that needs the mask regenerates it from that pair.

Layout. Rows come in pairs ``(16u + g, 16u + 8 + g)`` (``g < 8``), pair index ``p = 8u + g``. The
element ``(b, h, i, j)`` of the ``(batch, heads_q, seqlen_q, seqlen_k)`` attention matrix, with
``i = 16u + 8s + g`` and ``j = 32a + 8w + 2t + c`` (``s, c < 2``; ``w, t < 4``), takes byte ``2s + c``
of the 32-bit word ``w`` that Philox produces for counter

    offset // 4  +  ((b * heads_q + h) * P + p) * ceil(seqlen_k / 32) * 4  +  4a + t,

with ``P = ceil(seqlen_q / 16) * 8`` pairs per head. One Philox call thus serves sixteen elements,
the sixteen a thread of a Hopper MMA tile holds in two rows and one 32-column block (rows g and
g + 8, columns 2t, 2t + 1 repeating every 8): the compiler places each call in the thread that
consumes it, no shuffles. Philox is integer work that competes with the softmax for the ALUs, so
sixteen elements per call cost half of eight (16-bit thresholds) and a quarter of four.

An element is kept when its byte is >= ``round(dropout_p * 256)``: the drop probability is
``dropout_p`` rounded to a multiple of 1/256 (as in FlashAttention), and kept values are scaled by
``1 / (1 - that probability)`` so the expectation stays exact. All counter arithmetic is 64-bit
(B·H·N² overflows 32 bits at long context).
"""

import torch
import triton
import triton.language as tl

# Philox4x32 with 7 rounds passes BigCrush (Salmon et al., "Parallel random numbers: as easy as
# 1, 2, 3", SC'11); 10 is Triton's conservative default. Each round costs ALU time in the hot loop.
PHILOX_ROUNDS = 7
_THRESHOLD_BITS = 8


@triton.jit
def dropout_keep_tile(seed, pair_counters, col_start, drop_threshold,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_ROUNDS: tl.constexpr):
    """Keep-mask of one (BLOCK_M, BLOCK_N) tile whose first row is a multiple of 16.

    ``pair_counters`` (BLOCK_M // 2,) int64 is the first counter of each row pair of the tile, in
    pair order (see ``pair_counter_base``); ``col_start`` is a multiple of 32.

    Built by broadcasting each counter over the (s, w, c) axes it serves and reshaping: the eight
    (w, c) columns and the two rows s of a counter are what one MMA thread holds, so the reshape
    is a register relabelling and each thread computes only its own counters.
    """
    PAIR_BLOCKS: tl.constexpr = BLOCK_M // 16
    BLOCKS: tl.constexpr = BLOCK_N // 32
    # Axes (u, s, g, a, w, t, c): row 16u + 8s + g, column 32a + 8w + 2t + c.
    pairs = tl.reshape(pair_counters, (PAIR_BLOCKS, 1, 8, 1, 1, 1, 1))
    a = tl.arange(0, BLOCKS)[None, None, None, :, None, None, None]
    t = tl.arange(0, 4)[None, None, None, None, None, :, None]
    counters = pairs + (col_start // 8 + 4 * a + t)
    w0, w1, w2, w3 = tl.randint4x(seed, counters, N_ROUNDS)
    word = tl.arange(0, 4)[None, None, None, None, :, None, None]
    chosen = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
    s = tl.arange(0, 2)[None, :, None, None, None, None, None]
    c = tl.arange(0, 2)[None, None, None, None, None, None, :]
    byte = ((chosen >> (16 * s + 8 * c)) & 0xFF).to(tl.int32)
    return tl.reshape(byte >= drop_threshold, (BLOCK_M, BLOCK_N))


@triton.jit
def head_first_pair(head_index, seqlen_q):
    """Index of the first row pair of head ``b * heads_q + h`` (int64)."""
    return head_index.to(tl.int64) * (tl.cdiv(seqlen_q, 16) * 8)


@triton.jit
def pair_counter_base(counter_base, first_pair, counters_per_row, BLOCK_M: tl.constexpr):
    """First Philox counter of each row pair of a tile whose pairs start at ``first_pair``
    (``head_first_pair(...) + m0 // 2``, m0 a multiple of 16): (BLOCK_M // 2,) int64."""
    return counter_base + (first_pair + tl.arange(0, BLOCK_M // 2)) * counters_per_row


def drop_threshold(dropout_p: float) -> int:
    """Integer threshold on a uniform byte: dropped with probability ``threshold / 256``."""
    levels = 1 << _THRESHOLD_BITS
    return min(int(round(dropout_p * levels)), levels - 1)


def effective_dropout_p(dropout_p: float) -> float:
    """The drop probability the kernels realize: ``dropout_p`` rounded to a multiple of 1/256."""
    return drop_threshold(dropout_p) / (1 << _THRESHOLD_BITS)


def drop_rescale(dropout_p: float) -> float:
    """Scale of kept values, ``1 / (1 - effective p)``: keeps the expectation exact."""
    return 1.0 / (1.0 - effective_dropout_p(dropout_p))


def counters_per_row(seqlen_k: int) -> int:
    """Counters of one row pair: whole blocks of 32 columns, so pairs never share a counter."""
    return triton.cdiv(seqlen_k, 32) * 4


def philox_counters(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int) -> int:
    """How many Philox counters one attention call consumes."""
    return batch * heads_q * triton.cdiv(seqlen_q, 16) * 8 * counters_per_row(seqlen_k)


def kernel_seed(seed: int) -> int:
    """The seed as the kernels take it: bit 62 set, so it is always a 64-bit kernel argument."""
    return (seed & (2**62 - 1)) | 2**62


def kernel_counter_base(offset: int) -> int:
    """First Philox counter of a call. Offset by 2**40 so it is always a 64-bit kernel argument:
    Triton compiles a kernel per argument type, and an offset that grows past 2**31 mid-run would
    otherwise trigger a recompilation (a full second) in the middle of training."""
    return offset // 4 + 2**40


def device_seed(device: torch.device) -> torch.Tensor:
    """A seed drawn on the device, for calls that CUDA graphs capture: (1,) int64 in [2**62, 2**63),
    already in ``kernel_seed``'s form. ``next_seed_offset`` reads the generator on the host, which a
    captured graph would replay as the same numbers (the same mask every step); a ``randint`` on the
    device is capture-safe (PyTorch advances the generator at every replay) and ``torch.manual_seed``
    still governs it (tests/kernels/test_device_seeds.py). A checkpointed recompute, which restores
    the generator, should draw the same seed again; that is not tested. Every call gets its own Philox key
    and counts from counter base ``kernel_counter_base(0)``; the kernels read the seed from memory
    (``SEED_IN_MEMORY``)."""
    return torch.randint(2**62, 2**63 - 1, (1,), device=device, dtype=torch.int64)


def seed_arguments(seed, offset: int) -> tuple:
    """``(seed argument, counter base, seed in memory)`` of a launch: a host seed as ``kernel_seed``
    makes it with the counter base of ``offset``, or a ``device_seed`` tensor itself (the kernel
    loads it) with counter base 0."""
    if isinstance(seed, torch.Tensor):
        return seed, kernel_counter_base(0), True
    return kernel_seed(seed), kernel_counter_base(offset), False


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
