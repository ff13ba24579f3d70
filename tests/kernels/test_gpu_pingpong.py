"""GPU-only checks of the ping-pong forward for sm_90 (_forward_pingpong.py, _pingpong_blocks.py):
numerics against float64 at real sizes for its tiles, tile orders and consumer counts, with and
without dropout and for each schedule option, through flash_attention."""

import pytest
import torch

from .numerics import random_qkv
from .test_gpu import sm90_exactly
from .test_gpu_gluon import check_default_forward, gluon_kernel_matches_reference_with_dropout

pytestmark = pytest.mark.gpu


# (head dim, tiles, head-major): the tiles measured fastest in their cells (attention_notes v18,
# v21, v22, v34, v35), and both tile orders and consumer counts at head dim 64 and 128.
PINGPONG_TILES = [(128, (192, 64, 4, 3), True), (64, (192, 128, 4, 3), False),
                  (64, (128, 128, 4, 3), True), (128, (128, 128, 4, 2), False),
                  (64, (192, 64, 4, 3), True), (128, (192, 64, 4, 3), False),
                  (128, (128, 64, 4, 3), False), (128, (128, 64, 4, 4), True),
                  (128, (192, 64, 4, 4), False)]


@sm90_exactly
@pytest.mark.parametrize("head_dim, tiles, head_major", PINGPONG_TILES)
@pytest.mark.parametrize("seqlen, heads_q, heads_k, packed",
                         [(1024, 4, 4, False), (4096, 8, 2, False), (640, 4, 1, True)])
@pytest.mark.parametrize("causal", [False, True])
def test_pingpong_forward_on_gpu(head_dim, tiles, head_major, seqlen, heads_q, heads_k, packed,
                                 causal, monkeypatch):
    # Against float64, through flash_attention; GQA; 640 tokens: a partial last query tile of 192
    # rows (causal: its last consumers only pass their turns on; else they compute and store
    # nothing) and, packed, q, k and v as strided slices of one (batch, seqlen, heads, head_dim)
    # tensor; at 4096, 352 or 512 tiles: two or three whole rounds of 132 programs and a partial
    # one (causal, not head-major: every other whole round runs backwards; causal, each consumer
    # stops at its own last row's key block); the launch plan's second call gives the same
    # result.
    from kernels import _eager_plan, _forward
    from kernels._launch import Tiles
    from kernels.qkv_packed import split_qkv
    pingpong = Tiles(*tiles, gluon=True, pingpong=True, head_major=head_major)
    monkeypatch.setattr(_forward, "default_tiles", lambda *args: pingpong)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    if packed:
        qkv = torch.randn(2, seqlen, heads_q + 2 * heads_k, head_dim, device="cuda")
        qkv = qkv.to(torch.bfloat16)
        q, k, v = (t.detach().requires_grad_() for t in split_qkv(qkv, heads_k))
    else:
        q, k, v = random_qkv((2, seqlen, heads_q, head_dim), (2, seqlen, heads_k, head_dim),
                             torch.bfloat16, "cuda")
    check_default_forward(q, k, v, causal, _forward.FORWARD_PINGPONG)


# The ping-pong forward with dropout: tiles that compile without spills in their key-block loops
# on sm_90 (scripts/kernel_resources.py), two and three consumers; 640 tokens leave 192-row
# tiles a partial last one.
PINGPONG_DROPOUT_TILES = [(64, (128, 128, 4, 3), 1024), (64, (192, 64, 4, 3), 640),
                          (64, (128, 64, 4, 4), 1024), (128, (128, 64, 4, 4), 1024),
                          (128, (192, 64, 4, 3), 640)]


@sm90_exactly
@pytest.mark.parametrize("head_dim, tiles", [(64, (192, 64, 4, 3)), (64, (128, 128, 4, 3)),
                                             (128, (192, 64, 4, 3)), (128, (128, 64, 4, 4))])
@pytest.mark.parametrize("causal", [False, True])
def test_pingpong_forward_with_its_step_in_a_loop_on_gpu(head_dim, tiles, causal, monkeypatch):
    # SCHEDULE bit 1 without dropout: against float64, 640 tokens (a partial last tile at 192
    # rows) and 4096 with GQA.
    from kernels import _eager_plan, _forward
    from kernels._launch import Tiles
    monkeypatch.setattr(_forward, "default_tiles",
                        lambda *args: Tiles(*tiles, gluon=True, pingpong=True))
    monkeypatch.setattr(_forward, "PINGPONG_SCHEDULE", 2)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    for seqlen, heads_k in ((640, 4), (4096, 2)):
        q, k, v = random_qkv((2, seqlen, 4, head_dim), (2, seqlen, heads_k, head_dim),
                             torch.bfloat16, "cuda")
        check_default_forward(q, k, v, causal, _forward.FORWARD_PINGPONG)


@sm90_exactly
@pytest.mark.parametrize("head_dim, tiles, seqlen", PINGPONG_DROPOUT_TILES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("schedule", [0, 1, 2, 3])
def test_pingpong_forward_with_dropout_on_gpu(head_dim, tiles, seqlen, causal, schedule,
                                              monkeypatch):
    # Each consumer draws its own 64 rows' mask (after the softmax step, or while its products
    # run, and with the step in a loop of its own or not: _forward.PINGPONG_SCHEDULE); the
    # gradients come from the default backward, which regenerates the mask from the same seed and
    # offset.
    from kernels import _eager_plan, _forward
    from kernels._launch import Tiles
    pingpong = Tiles(*tiles, gluon=True, pingpong=True)
    monkeypatch.setattr(_forward, "default_tiles", lambda *args: pingpong)
    monkeypatch.setattr(_forward, "PINGPONG_SCHEDULE", schedule)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    gluon_kernel_matches_reference_with_dropout(head_dim, causal, _forward.FORWARD_PINGPONG, seqlen)
