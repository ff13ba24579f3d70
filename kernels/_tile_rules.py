"""Which tiles, and so which kernel, each call gets by default: every rule beside the measurements
it rests on (docs/results/attention_notes.md has the experiments). The forward's (``forward_tiles``
and the TMA, Gluon and ping-pong kernels' ``*_forward_tiles``), and the backward's dK/dV and dQ
passes' (``dkdv_tiles``, ``dq_tiles``). Hopper kernels are chosen only on sm_90
(``_launch.capability``, looked up at call time so tests can stand in for a GPU)."""

import torch

from . import _launch
from ._launch import Tiles


# Chosen on an H100 80GB HBM3 (bf16, 16384 tokens, hidden 2048) with scripts/tune_attention.py;
# the sweep and its numbers are in docs/results/attention_notes.md. Head dims above 128 are sized to
# fit shared memory and registers. float32 (tests only) uses small tiles: twice the bytes per element.
def forward_tiles(head_dim: int, device: torch.device, dtype: torch.dtype) -> Tiles:
    if device.type != "cuda":
        return Tiles(16, 32, 1, 1)   # the interpreter: small tiles run fastest in numpy
    if dtype == torch.float32:
        return Tiles(64, 32, 4, 2) if head_dim <= 128 else Tiles(32, 32, 4, 1)
    if head_dim <= 128:
        return Tiles(64, 64, 4, 3)
    return Tiles(64, 32, 4, 2)


def tma_forward_tiles(head_dim: int, device: torch.device, dtype: torch.dtype) -> Tiles | None:
    """Tiles of the TMA forward where it beat the portable kernel's tuned tiles in every run: on an
    H200 (bf16, 16384 tokens, hidden 2048; docs/results/attention_notes.md, v7) at head dim 128
    without a band, dropout or a ragged last key block, +5-15 % forward TFLOP/s in three runs. None
    elsewhere: at head dim 64 it gained 1-6 % (noise), with a causal mask it lost, other head dims
    and GPUs are unmeasured, and before sm_90 there is no TMA."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or head_dim != 128:
        return None
    if _launch.capability(device) < (9, 0):
        return None
    return Tiles(128, 64, 4, 2, tma=True)


def gluon_forward_tiles(head_dim: int, device: torch.device, dtype: torch.dtype,
                        causal: bool, dropout: bool = False) -> Tiles | None:
    """Tiles of the Gluon forward where it beat the portable and TMA kernels (H200, bf16, 16384
    tokens, hidden 2048, same process; docs/results/attention_notes.md). Without dropout (v8): head
    dim 128 with the causal mask, 486 forward TFLOP/s against 432 (portable) and 428 (TMA); without
    a mask it tied the TMA forward (531 against 535) and at head dim 64 it lost. With dropout
    (v14, where the TMA forward does not apply): head dim 128, 414 against 392 without a mask and
    374 against 355 causal; head dim 64 without a mask, 298 against 276. None elsewhere, and off
    sm_90 (its warpgroup MMAs exist there only)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or head_dim not in (64, 128):
        return None
    if _launch.capability(device)[0] != 9:
        return None
    if dropout:
        if head_dim == 128:
            return Tiles(64, 64, 4, 3, gluon=True) if causal else Tiles(128, 128, 8, 3, gluon=True)
        return None if causal else Tiles(128, 64, 8, 4, gluon=True)
    if head_dim == 128 and causal:
        return Tiles(64, 64, 4, 3, gluon=True)
    return None


# Where the ping-pong forward beat the previous default forward (H200, bf16, hidden 2048, batch x
# seqlen = 16K tokens, same process; docs/results/attention_notes.md v18, confirmed through the
# library in v19), without dropout: by (head dim, causal), the tiles it runs from each length on,
# shortest first (below the first, the previous default). v19's figures (speed-up): +13 / +17 /
# +13 % at d128, +14 / +20 / +25 % at d64 causal 4K / 8K / 16K, +11 % at d64 without a mask 16K.
# At 512 tokens (v32; 32 x 512, two processes), forward time: d128 -20 % without a mask, -25 %
# causal; d64 without a mask, 128 x 128 tiles -13 %, and -12 / -10.5 / -8.5 % at 1K / 2K / 4K
# (192 x 64: -3 / -8.5 / -7 %).
PINGPONG_TILES = {
    # 3 warpgroups, 64-key blocks: +14 / +21 / +17 % at 1K / 4K / 16K (v18); 128 x 64 was 1-2.5 %
    # faster at 512-1K (v32), level at 2K and beyond. Below 2K, 2 warpgroups with four K/V stages
    # (v35, two processes, forward time against 192 x 64 with three: -1.0 / -1.6 % at 512,
    # -2.1 / -2.4 % at 1K; three stages +0.3 / +0.6 % at 512)
    (128, False): ((512, Tiles(128, 64, 4, 4, gluon=True, pingpong=True, head_major=True)),
                   (2048, Tiles(192, 64, 4, 3, gluon=True, pingpong=True, head_major=True))),
    # causal, 3 warpgroups, 64-key blocks in query-block order, three runs (v19, v21, v22): +2 to
    # +8 % at 1K-8K; 16K -1 % and +3 % (v21, v22). Below 1K, 2 warpgroups (v34, 32 x 512, two
    # processes: forward time -2.3 %; at 1K -1.4 / -0.5 %, at 2K +11 / +15 %). At 1K four K/V
    # stages (v34: -2 %; v35, two processes: -3.4 / -3.5 %; at 512 and 2K mixed, -4 to +2 %).
    (128, True): ((512, Tiles(128, 64, 4, 3, gluon=True, pingpong=True)),
                  (1024, Tiles(192, 64, 4, 4, gluon=True, pingpong=True)),
                  (2048, Tiles(192, 64, 4, 3, gluon=True, pingpong=True))),
    # causal, 3 warpgroups, 128-key blocks: +6 / +29 % at 4K / 16K (1K: -24 %); from 2K since each
    # consumer stops at its own rows' key blocks (v31: forward time -5 % at 32 heads, -8.5 % at
    # 12; at 1K still +4.5 / +6 %, at 512 +7 to +18 % (v32))
    (64, True): ((2048, Tiles(192, 128, 4, 3, gluon=True, pingpong=True)),),
    # 2 warpgroups of 128-key blocks to 4K (v32: forward time -8.5 % at 4K; 192 x 64 -7 %); 3
    # warpgroups, 64-key blocks from 8K: +8 / +3 % speed-up at 8K / 16K (v21), where 128 x 128
    # was 3 / 1 % slower (v32)
    (64, False): ((512, Tiles(128, 128, 4, 3, gluon=True, pingpong=True, head_major=True)),
                  (8192, Tiles(192, 64, 4, 3, gluon=True, pingpong=True, head_major=True))),
}


# With dropout (each consumer drawing its rows' keep-mask), by (head dim, causal): forward time of
# GPT-2 small's call (12 heads, 16K tokens, causal, dropout 0.1) against the portable forward, on
# an H100 (v43, two processes at 4K): 128 x 128 x 3 -9.4 / -9.7 % at 4K, -12.7 % at 8K, -1.6 % at
# 2K (level: not taken); SCHEDULE options lost or were level.
PINGPONG_DROPOUT_TILES = {
    (64, True): ((4096, Tiles(128, 128, 4, 3, gluon=True, pingpong=True)),),
}


def pingpong_forward_tiles(head_dim: int, device: torch.device, dtype: torch.dtype, causal: bool,
                           dropout: bool, seqlen_q: int, seqlen_k: int) -> Tiles | None:
    """Tiles of the ping-pong forward where it was measured fastest (``PINGPONG_TILES``, with
    dropout ``PINGPONG_DROPOUT_TILES``; as many queries as keys); None elsewhere: settings not
    measured, few queries (each 128- or 192-row tile would be mostly padding, e.g. one query
    against a long cache: unmeasured), and off sm_90."""
    key = (head_dim, causal)
    rules = PINGPONG_DROPOUT_TILES if dropout else PINGPONG_TILES
    if key not in rules or device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    if _launch.capability(device)[0] != 9:
        return None
    chosen = None
    for shortest, tiles in rules[key]:
        if min(seqlen_q, seqlen_k) >= shortest:
            chosen = tiles
    return chosen


# From these query lengths on (by head dim, causal, dropout), the warp-specialized fused pass is the
# backward's default (dkdv_tiles), with WARP_SPECIALIZED_STAGES. Whole backward through the library
# against the previous default, three rounds in one process (H200; attention_notes.md):
# - head dim 128 without dropout (v20): without a mask +7 / +16 / +27 / +30 / +30 % at 1K / 2K / 4K /
#   8K / 16K tokens; causal -4 / -0.3 / +9 / +13 / +24 %.
# - head dim 64 without dropout (v21; four stages): without a mask +4 / +8 / +9 / +9 % at 2K / 4K /
#   8K / 16K; causal +3 / +8 / +9 % at 4K / 8K / 16K. Below, three stages lost: -4 % at 1K without
#   a mask, -13 / -2 % causal at 1K / 2K.
# - dropout 0.1 (v22), against the dropout defaults: head dim 128 without a mask +8 / +22 / +27 /
#   +30 / +34 % at 1K / 2K / 4K / 8K / 16K, causal -6 / +5 / +15 / +21 / +26 %; head dim 64
#   without a mask +5 / +11 / +8 / +10 / +11 %, causal -10 / -1 / +6 / +10 / +13 %. With each
#   block's dQ taken a block late and the statistics loaded a block ahead (v27), head dim 64 causal
#   at 2K: dK/dV kernel 0.515 ms against the portable fused pass's 0.520 (+1 %, one round); at 1K
#   it lost (0.334 against 0.299).
# - head dim 128 causal at 2K (v28; 8 x 2048 tokens, 16 heads, q, k and v sliced from one packed
#   tensor, two processes), its programs heaviest key block first: 0.998 / 1.000 ms against 1.13 /
#   1.14 for the previous default (-12 %); at 1K level (0.712 against 0.71).
# Every call that the fused Gluon pass with 64-query blocks (_dkdv_gluon.py, FUSE_DQ) was the default
# for at head dim 64 (v16, v17) now runs this pass; that one stays reachable through explicit tiles.
WARP_SPECIALIZED_MIN_SEQLEN = {
    # (head_dim, causal, dropout): shortest query length where it won
    (64, False, False): 2048, (64, True, False): 4096, (64, False, True): 1024, (64, True, True): 2048,
    (128, False, False): 1024, (128, True, False): 2048, (128, False, True): 1024, (128, True, True): 2048,
}
# Four stages fit at head dim 64 (164 KB of shared memory; +1.4 to +1.9 % over three without a mask,
# level causal, v21); at 128 three need 246 KB, past sm_90's 227.
WARP_SPECIALIZED_STAGES = {64: 4, 128: 2}


def _warp_specialized_pays(head_dim: int, causal: bool, dropout: bool, seqlen: int) -> bool:
    """Whether the warp-specialized fused pass beat the previous default for this call (H200)."""
    shortest = WARP_SPECIALIZED_MIN_SEQLEN.get((head_dim, causal, dropout))
    return shortest is not None and seqlen >= shortest


# The query lengths (shortest, longest) where the warp-specialized pass in a persistent grid
# (_dkdv_ws_persistent.py) beat it in a grid of one program per key block, by (head dim, causal,
# dropout); whole backward, three rounds in one process (H200; attention_notes.md, v22). Without
# a mask: head dim 128 +8.5 / +6.2 / +2.0 / -1.5 / -0.7 % at 1K / 2K / 4K / 8K / 16K (1K again:
# +8.4 %), 64 +16.5 / +10.6 / +5.2 / +1.9 / -1.0 % (1K again: +15.5 %); at head dim 64 and 1K
# that is +12 % over the previous default, which the non-persistent pass had lost to (-4 %). At
# head dim 128 and 4K the gain was within the rounds' spread and the grid's cell came out lower
# than with one program per key block, so 4K stays there. Causal it lost (0.69-0.96); with
# dropout too (head dim 128 -2 to -6 %; 64: +3 % at 2K, -1 / -2 % at 4K / 16K).
# Head dim 64 causal at 2K, with two K/V buffers (v24; GPT-2's training shapes, 8 x 2048 tokens, q, k
# and v sliced from one packed tensor, three rounds, two runs): +3 to +5 % at 12 heads and +4 to
# +5 % at 32 against the previous default (the portable pass); at 1K (16 x 1024) 7 % behind the
# portable pass, at 4K (4 x 4096) 6 % behind the per-key-block pass; with dropout level or behind
# at 1K-8K. Head dim 64 without a mask at 8K, with each block's dQ taken a block late (v27; dK/dV
# kernel, two processes): 2.17 / 2.13 ms against 2.24 / 2.26 in the per-key-block grid.
# Causal, with every other round of the grid reversed (v28; 16K tokens, 32 heads at head dim 64
# and 16 at 128, q, k and v sliced from one packed tensor, two processes), whole backward against
# the previous default: head dim 64 -8 / -12 / -11 / -5 % at 1K / 2K / 4K / 8K (0.68 / 1.02 / 1.75
# / 3.25 ms; cuDNN's 0.69 / 1.06 / 1.83 / 3.40); head dim 128 -7 % at 1K, level with the
# per-key-block pass at 2K (1.00 ms both), 7 % behind it at 4K. At GPT-2 small's 12 heads (4 x
# 4096) the training step measured it level with the per-key-block pass (train_notes.md,
# 2026-12-04). With the causal grid a multiple of the key blocks per head
# (_backward.persistent_programs; v29, same calls, two processes), against the per-key-block pass
# at 12 heads: head dim 64 -23 / -18 / -11.5 / -7 % at 1K / 2K / 4K / 8K (0.272 / 0.401 / 0.664 /
# 1.21 ms; cuDNN's 0.283 / 0.427 / 0.722 / 1.29); at 32 heads level with all 132 SMs; head dim 128
# at 16 heads -8 / -4 % at 1K / 2K. Head dim 64 causal at 16K (v30, one sequence, two processes
# each): 6.15-6.20 ms against the per-key-block pass's 6.40-6.48 at 32 heads, 2.31-2.33 against
# 2.42-2.45 at 12 (cuDNN's 6.44-6.46 and 2.42-2.44).
# At 512 tokens (v32; 32 x 512, two processes), whole backward time against the previous
# defaults (the Gluon two-pass backward at head dim 128, the portable pass at 64): without
# dropout, head dim 128 -17 / -2 % without a mask / causal, 64 -14 / -3.5 %. With dropout 0.1 and
# one K/V buffer: head dim 128 without a mask -7.5 / -2 % at 512 / 1K (+3 % at 2K), 64 without a
# mask -13 / -12 / -6 / -1 % at 512 / 1K / 2K / 4K, 64 causal -3 / -8.5 % at 1K / 2K (+5 % at
# 512); 128 causal level at 1K. Head dim 128 causal with dropout (v34; 16 x 1024, 8 x 2048 and
# 4 x 4096 tokens, two processes): -3.4 % at 2K (1.237 / 1.238 ms against 1.280 / 1.281), level at
# 1K (0.816 / 0.813 against 0.816 / 0.816), +1 % at 4K. With dK and dV stored by TMA (v38, two
# processes, against the Gluon two-pass default): -7.1 / -6.5 % at 1K (0.763 / 0.763 ms against
# 0.821 / 0.816), +4.5 / +4.1 % at 512. Its gradients matched the portable pass's within 0.004.
WARP_SPECIALIZED_PERSISTENT_SEQLEN = {(64, False, False): (512, 8192),
                                      (64, True, False): (512, 16384),
                                      (128, False, False): (512, 2048),
                                      (128, True, False): (512, 2048),
                                      (64, False, True): (512, 4096),
                                      (64, True, True): (1024, 2048),
                                      (128, False, True): (512, 1024),
                                      (128, True, True): (1024, 2048)}

# K/V buffers of the persistent pass by head dim, without dropout. Two let the producer load the
# next tile's K and V while the consumers still read this tile's; they fit shared memory at head
# dim 64 only. Whole backward against one buffer (d64, no mask, three rounds in one process, H200;
# attention_notes v23): +3.3 / +2.8 / +2.8 / +1.8 % at 1K / 2K / 4K / 8K; the rounds did not
# overlap in any cell. With dropout one buffer was faster (v32, d64 without a mask: -8 / -8.5 / -9 %
# at 512 / 1K / 2K against two).
PERSISTENT_KV_BUFFERS = {64: 2}


# The query lengths (shortest, longest) where the warp-specialized pass with a mask partition
# (_dropout_mask_partition.py: two warps draw the dropout keep-masks for the consumers) beat it
# without one, by (head dim, causal). Whole backward with dropout 0.1, four rounds in each of two
# processes (H200, 16K tokens; attention_notes.md, v35): head dim 128 causal -3.3 / -2.8 % at 4K /
# 8K (2.011 against 2.078 ms at 4K), level at 1K / 2K / 16K. Elsewhere it lost: head dim 128 without
# a mask +14 to +19 % at 512-8K, head dim 64 +40 to +69 %, and in the persistent grid +6 to +24 %
# at head dim 128. Four mask warps instead of two (v36) were no faster: level at 1K-4K, +3 % at
# 8K-16K against the consumers' drawing, +13 to +26 % without a mask.
MASK_PARTITION_SEQLEN = {(128, True): (4096, 8192)}


# Calls of the warp-specialized pass with one program per key block that store dK and dV from the
# consumers' registers rather than by TMA (_backward.key_gradients_by_tma), by (head dim, causal,
# dropout). Whole backward, TMA against registers (H200, 16K tokens; attention_notes v37): head
# dim 128 -9 / -11 % at 512 tokens (no mask / causal), -6 / -7 % at 1K, -3.5 / -2.5 % at 2K, -2 %
# at 4K and 16K without a mask and level causal; with dropout -9 % at 512, -2.7 % at 2K causal and
# at 16K; head dim 64 -9 / -5 % at 512 / 2K, -5 % causal at 1K, level at 16K, -6 % with dropout at
# 1K. Head dim 64 causal with dropout lost in the per-key-block grid: +2.7 / +3.8 % at 8K (two
# processes), +4.1 / +3.5 % at 4K / 16K.
REGISTER_GRADS = {(64, True, True)}


def _within(lengths: tuple[int, int] | None, seqlen: int) -> bool:
    """Whether ``seqlen`` lies in a rule's measured (shortest, longest); False without a rule."""
    return lengths is not None and lengths[0] <= seqlen <= lengths[1]


def _mask_partition_pays(head_dim: int, causal: bool, seqlen: int) -> bool:
    """Whether drawing the keep-masks in warps of their own beat the consumers' drawing (H200)."""
    return _within(MASK_PARTITION_SEQLEN.get((head_dim, causal)), seqlen)


def _persistent_pays(head_dim: int, causal: bool, dropout: bool, seqlen: int) -> bool:
    """Whether the persistent warp-specialized pass beat the non-persistent one here (H200)."""
    return _within(WARP_SPECIALIZED_PERSISTENT_SEQLEN.get((head_dim, causal, dropout)), seqlen)


def dkdv_tiles(head_dim: int, device: torch.device, dtype: torch.dtype, causal: bool,
               dropout: bool = False, hopper: bool = True, seqlen: int = 0,
               deterministic: bool = False, persistent: bool = True) -> Tiles:
    """Tiles of the dK/dV pass: block_n keys held on chip, block_m queries streamed. ``hopper=False``
    gives the portable pass's own tiles, for calls the Gluon pass does not take. ``seqlen``: the
    call's query length (0 if unknown). ``deterministic``: tiles of the two passes only, never of
    the fused pass, whose dQ is summed by atomic adds in no fixed order (under
    ``torch.use_deterministic_algorithms``); where a fused pass is the default, the tiles the
    two-pass default had before it. ``persistent=False``: never the persistent pass's tiles (for
    calls it does not take: inputs that are not rows of one matrix)."""
    if device.type != "cuda":
        return Tiles(16, 32, 1, 1)
    if dtype == torch.float32:
        return Tiles(32, 32, 4, 1) if head_dim <= 128 else Tiles(16, 32, 4, 1)
    # The warp-specialized fused pass (_dkdv_warp_specialized.py), from the lengths where it beat
    # the previous defaults below (WARP_SPECIALIZED_MIN_SEQLEN), in a persistent grid where that
    # beat it (WARP_SPECIALIZED_PERSISTENT_SEQLEN).
    in_a_persistent_grid = persistent and _persistent_pays(head_dim, causal, dropout, seqlen)
    if (hopper and not deterministic
            and (in_a_persistent_grid or _warp_specialized_pays(head_dim, causal, dropout, seqlen))
            and _hopper_gpu(device)):
        return Tiles(64, 128, 4, WARP_SPECIALIZED_STAGES[head_dim], gluon=True, fused=True,
                     warp_specialized=True, persistent=in_a_persistent_grid,
                     kv_buffers=PERSISTENT_KV_BUFFERS.get(head_dim, 1)
                     if in_a_persistent_grid and not dropout else 1,
                     mask_partition=(dropout and not in_a_persistent_grid
                                     and _mask_partition_pays(head_dim, causal, seqlen)),
                     register_grads=(not in_a_persistent_grid
                                     and (head_dim, causal, dropout) in REGISTER_GRADS))
    if head_dim <= 64:
        # 32x128 wins without a mask; with causal or dropout masks 64x64 does (+30 % with dropout).
        # With dropout the fused pass (dQ added by atomics, one mask regeneration instead of two):
        # whole backward +19.5 % causal (H200, 16K tokens; attention_notes.md, v10).
        if dropout:
            return Tiles(64, 64, 4, 3, fused=not deterministic)
        return Tiles(64, 64, 4, 3) if causal else Tiles(32, 128, 4, 3)
    if head_dim <= 128:
        if dropout:
            # On sm_90 the Gluon pass: whole backward +12 % without a mask, +18 % causal against
            # the portable tiles below (H200, 16K tokens; attention_notes.md, v14).
            if hopper and _hopper_gpu(device):
                return Tiles(32, 64, 4, 4, gluon=True)
            # The portable dropout path runs untransposed tiles (_backward_kernels.py): its own
            # sweep. Causal: without pipelining, 128x64 beats 64x32 by 0-9 % (whole backward, 2K-16K).
            return Tiles(128, 64, 8, 1) if causal else Tiles(128, 64, 8, 2)
        # On sm_90 the Gluon pass with the same tiles: whole backward +6.7 % without a mask, +4.5 %
        # causal (H200, 16K tokens; attention_notes.md, v9). Calls it does not cover (varlen, GQA,
        # ragged blocks) run the portable pass with these tiles.
        return Tiles(32, 64, 4, 3, gluon=head_dim == 128 and hopper and _hopper_gpu(device))
    return Tiles(32, 32, 4, 2)


def dq_tiles(head_dim: int, device: torch.device, dtype: torch.dtype, dropout: bool = False) -> Tiles:
    """Tiles of the dQ pass: block_m queries held on chip, block_n keys streamed."""
    if device.type != "cuda":
        return Tiles(16, 32, 1, 1)
    if dtype == torch.float32:
        return Tiles(32, 32, 4, 1) if head_dim <= 128 else Tiles(16, 32, 4, 1)
    # On sm_90 without dropout, the Gluon pass with the same tiles at head dim 64 and 128: whole
    # backward +8 % (d64) and +5.7 % (d128) without a mask, +3.6 % and +4.2 % causal (H200, 16K
    # tokens; attention_notes.md, v9). Calls it does not cover run the portable pass.
    gluon = head_dim in (64, 128) and not dropout and _hopper_gpu(device)
    if head_dim <= 64:
        return Tiles(64, 64, 4, 3, gluon=gluon)
    if head_dim <= 128:
        return Tiles(64, 32, 4, 3, gluon=gluon)
    return Tiles(64, 32, 4, 2)


def _hopper_gpu(device: torch.device) -> bool:
    """sm_90 exactly: the Gluon kernels' warpgroup MMAs exist there only."""
    return _launch.capability(device)[0] == 9
