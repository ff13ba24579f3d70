"""Dropout randomness for the attention kernels: counter-based Philox, replayable from (seed, offset).

The forward never stores a dropout mask. It draws a ``(seed, offset)`` pair from PyTorch's generator
for the device (advancing the generator's offset so the next random op sees fresh numbers), and every
kernel that needs the mask regenerates it from that pair. The element ``(b, h, i, j)`` of the
``(batch, heads_q, seqlen_q, seqlen_k)`` attention matrix, with ``j = 32a + 8w + 2t + h``
(``w, t < 4``, ``h < 2``), takes the 16-bit half ``h`` of the 32-bit word ``w`` that Philox
produces for counter

    offset // 4  +  ((b * heads_q + h) * seqlen_q + i) * ceil(seqlen_k / 32) * 4  +  4a + t.

One Philox call thus serves eight columns: Philox is integer work that competes with the softmax for
the ALUs, so this halves its cost against one word per column (see ``dropout_keep_tile`` for why
these eight). All counter arithmetic is 64-bit (B·H·N² overflows 32 bits at long context). An element is
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
def dropout_keep_tile(seed, row_counters, col_start, drop_threshold,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_ROUNDS: tl.constexpr):
    """Keep-mask of one (BLOCK_M, BLOCK_N) tile.

    ``row_counters`` (BLOCK_M,) int64 is each row's first counter (see ``row_counter_base``);
    ``col_start`` must be a multiple of 32 (tiles always start on one).

    Column c = 32a + 8w + 2t + h (a block, w word, t pair, h half) takes half h of word w of counter
    4a + t. The eight columns of one counter are then the ones a thread of a Hopper MMA tile holds
    (pairs 2t, 2t + 1 repeating every 8 columns), so the compiler can place each Philox call in the
    thread that consumes its output instead of shuffling the mask through shared memory.
    """
    BLOCKS: tl.constexpr = BLOCK_N // 32
    # (BLOCK_M, BLOCKS, 1, 4, 1) counters, broadcast over the word and half axes.
    a = tl.arange(0, BLOCKS)[None, :, None, None, None]
    t = tl.arange(0, 4)[None, None, None, :, None]
    counters = row_counters[:, None, None, None, None] + (col_start // 8 + 4 * a + t)
    w0, w1, w2, w3 = tl.randint4x(seed, counters, N_ROUNDS)
    word = tl.arange(0, 4)[None, None, :, None, None]
    chosen = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
    half = tl.arange(0, 2)[None, None, None, None, :]
    bits = tl.where(half == 0, chosen & 0xFFFF, chosen >> 16).to(tl.int32)
    return tl.reshape(bits >= drop_threshold, (BLOCK_M, BLOCK_N))


@triton.jit
def _kept_halves(word, drop_threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N // 32, 4, 2): keep decisions of the low and high halves of each word."""
    kept = tl.join((word & 0xFFFF).to(tl.int32) >= drop_threshold,
                   (word >> 16).to(tl.int32) >= drop_threshold)
    return tl.reshape(kept, (BLOCK_M, BLOCK_N // 32, 4, 2))


@triton.jit
def dropout_keep_tile_compact(seed, row_counters, col_start, drop_threshold,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_ROUNDS: tl.constexpr):
    """The same mask as ``dropout_keep_tile``, built by computing each counter once on a compact
    (BLOCK_M, BLOCK_N // 8) tile and interleaving the results with joins.

    For tiles that are consumed transposed (the dK/dV pass): there no thread holds a counter's
    eight columns, and the broadcast form would make the compiler recompute Philox in every thread
    that needs one of them; moving the small boolean tile is cheaper.
    """
    counters = row_counters[:, None] + (col_start // 8 + tl.arange(0, BLOCK_N // 8))[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counters, N_ROUNDS)
    # Counter 4a + t of a row: view the compact tile as (BLOCK_M, BLOCK_N // 32, 4) over (a, t).
    h0 = _kept_halves(w0, drop_threshold, BLOCK_M, BLOCK_N)
    h1 = _kept_halves(w1, drop_threshold, BLOCK_M, BLOCK_N)
    h2 = _kept_halves(w2, drop_threshold, BLOCK_M, BLOCK_N)
    h3 = _kept_halves(w3, drop_threshold, BLOCK_M, BLOCK_N)
    # join(join(H0, H2), join(H1, H3)) adds axes (i, k) holding word 2i + k: (M, A, T, H, I, K).
    words = tl.join(tl.join(h0, h2), tl.join(h1, h3))
    ordered = tl.permute(words, (0, 1, 4, 5, 2, 3))          # (M, A, I, K, T, H): column order
    return tl.reshape(ordered, (BLOCK_M, BLOCK_N))


@triton.jit
def row_counter_base(counter_base, global_rows, counters_per_row):
    """First Philox counter of each global row ``(b * heads_q + h) * seqlen_q + i`` (int64)."""
    return counter_base + global_rows.to(tl.int64) * counters_per_row


def drop_threshold(dropout_p: float) -> int:
    """Integer threshold on a 16-bit uniform value: kept with probability ``1 - dropout_p``."""
    return int(round(dropout_p * (1 << _THRESHOLD_BITS)))


def counters_per_row(seqlen_k: int) -> int:
    # Whole blocks of 32 columns, so a row's counters never run into the next row's.
    return triton.cdiv(seqlen_k, 32) * 4


def philox_counters(batch: int, heads_q: int, seqlen_q: int, seqlen_k: int) -> int:
    """How many Philox counters one attention call consumes."""
    return batch * heads_q * seqlen_q * counters_per_row(seqlen_k)


def kernel_seed(seed: int) -> int:
    """The seed as the kernels take it: bit 62 set, so it is always a 64-bit kernel argument."""
    return (seed & (2**62 - 1)) | 2**62


def kernel_counter_base(offset: int) -> int:
    """First Philox counter of a call. Offset by 2**40 so it is always a 64-bit kernel argument:
    Triton compiles a kernel per argument type, and an offset that grows past 2**31 mid-run would
    otherwise trigger a recompilation (a full second) in the middle of training."""
    return offset // 4 + 2**40


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
