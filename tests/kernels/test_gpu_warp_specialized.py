"""GPU-only checks of the warp-specialized fused backward (_dkdv_warp_specialized.py): gradients
against float64 with and without dropout, the calls the default sends to it, and its replay in a
CUDA graph. Its compiled schedule is checked on the CPU (test_warp_specialized_backward.py)."""

import pytest
import torch

from kernels import flash_attention

from .numerics import backward_launch_configs, check_against_reference, random_qkv
from .test_gpu import sm90_exactly
from .test_gpu_gluon import fused_pass_matches_reference, gluon_kernel_matches_reference_with_dropout

pytestmark = pytest.mark.gpu


@sm90_exactly
@pytest.mark.parametrize("head_dim, stages", [(128, 2), (64, 2), (64, 3), (64, 4)])
@pytest.mark.parametrize("seqlen", [1024, 4096])
@pytest.mark.parametrize("causal", [False, True])
def test_warp_specialized_backward_on_gpu(head_dim, stages, seqlen, causal, monkeypatch):
    # dK, dV and (by the copy engine's reduce-adds, each consumer its columns) dQ from the
    # warp-specialized pass, δ from the portable delta-only pass; against float64; the causal
    # mask's diagonal blocks (each consumer's own 64 keys); more query blocks than stages. Six
    # (sequence, head) pairs: causal programs run four pairs at a time, then the last two.
    from kernels import _backward, _eager_plan
    from kernels._launch import Tiles
    tiles = Tiles(64, 128, 4, stages, gluon=True, fused=True, warp_specialized=True)
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: tiles)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    q, k, v = random_qkv((2, seqlen, 3, head_dim), (2, seqlen, 3, head_dim), torch.bfloat16, "cuda")
    fused_pass_matches_reference(q, k, v, causal, _backward.DKDV_WARP_SPECIALIZED)


@sm90_exactly
@pytest.mark.parametrize("head_dim, stages", [(128, 2), (64, 4)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masks", ["drawn in place", "mask_partition"])
def test_warp_specialized_backward_with_dropout_on_gpu(head_dim, stages, causal, masks,
                                                       monkeypatch):
    # Each consumer regenerates its 64 x 64 tiles of the forward's keep-mask, or with a mask
    # partition reads them from shared memory (16 query blocks through its 2 slots): the
    # gradients match float64 under the mask return_debug_mask materializes, with no fallback.
    from kernels import _backward, _eager_plan
    from kernels._launch import Tiles
    tiles = Tiles(64, 128, 4, stages, gluon=True, fused=True, warp_specialized=True,
                  mask_partition=masks == "mask_partition")
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: tiles)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    q = torch.empty(2, 1024, 4, head_dim, device="cuda", dtype=torch.bfloat16)
    options = backward_launch_configs(q, q, q, causal, 0.1)[1][3]
    assert options.get("MASK_PARTITION", False) == (masks == "mask_partition")
    gluon_kernel_matches_reference_with_dropout(head_dim, causal, _backward.DKDV_WARP_SPECIALIZED)


@sm90_exactly
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_long_calls_run_the_warp_specialized_pass(head_dim, dtype):
    # From WARP_SPECIALIZED_MIN_SEQLEN queries on (4K covers every causal and dropout case), with
    # and without dropout, in the persistent grid at head dim 64 (with dropout without a mask
    # only); GQA, which it
    # does not take, the portable pass. Against float64 (with dropout:
    # test_warp_specialized_backward_with_dropout_on_gpu).
    from kernels import _backward, _hopper
    from kernels._tile_rules import WARP_SPECIALIZED_MIN_SEQLEN
    n = 4096
    assert n >= max(WARP_SPECIALIZED_MIN_SEQLEN[key] for key in WARP_SPECIALIZED_MIN_SEQLEN
                    if key[0] == head_dim)
    for heads_k in (2, 1):
        q, k, v = random_qkv((1, n, 2, head_dim), (1, n, heads_k, head_dim), dtype, "cuda")
        for causal, dropout_p in [(False, 0.0), (True, 0.0), (False, 0.1), (True, 0.1)]:
            launcher = backward_launch_configs(q, k, v, causal, dropout_p)[1][0]
            # 4K: head dim 64 only, with dropout without a mask only
            persistent = head_dim == 64 and (not dropout_p or not causal)
            assert launcher is (_backward.DKDV if heads_k == 1 else _backward.DKDV_WS_PERSISTENT
                                if persistent else _backward.DKDV_WARP_SPECIALIZED)
            if not dropout_p:
                fallbacks = len(_hopper.FALLBACKS)
                check_against_reference(q, k, v, causal=causal)
                assert len(_hopper.FALLBACKS) == fallbacks


@sm90_exactly
@pytest.mark.parametrize("seqlen, launcher", [(1024, "DKDV_WS_PERSISTENT"),
                                              (8192, "DKDV_WARP_SPECIALIZED")])
def test_warp_specialized_backward_replays_in_a_cuda_graph(seqlen, launcher):
    # The default at head dim 128 without a mask (persistent grid to 2K tokens, one program per
    # key block beyond), captured with its forward in a CUDA graph (as the trainer's
    # reduce-overhead mode does): every replay's gradients equal the eager call's up to the
    # rounding of dQ's unordered adds, and the eager ones match float64.
    from kernels import _backward
    q, k, v = random_qkv((2, seqlen, 4, 128), (2, seqlen, 4, 128), torch.bfloat16, "cuda")
    assert backward_launch_configs(q, k, v, False, 0.0)[1][0] is getattr(_backward, launcher)
    check_against_reference(q, k, v)
    grad_out = torch.randn_like(q)
    step = lambda: torch.autograd.grad(flash_attention(q, k, v), (q, k, v), grad_out)
    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):       # warm-up off the default stream, as capture asks
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        for tensor in captured:
            tensor.zero_()
        graph.replay()
        torch.cuda.synchronize()
        for mine, theirs in zip(captured, eager):
            assert ((mine.float() - theirs.float()).norm() / theirs.float().norm()).item() < 1e-3


@sm90_exactly
@pytest.mark.parametrize("head_dim, stages, kv_buffers", [(128, 2, 1), (64, 4, 1), (64, 4, 2)])
@pytest.mark.parametrize("batch, seqlen, packed", [(2, 1024, False), (3, 4096, False),
                                                   (3, 640, True)])
@pytest.mark.parametrize("causal", [False, True])
def test_persistent_backward_on_gpu(head_dim, stages, kv_buffers, batch, seqlen, packed, causal,
                                    monkeypatch):
    # The persistent grid against float64: at 4K more tiles (3 x 4 heads x 32 key blocks) than
    # SMs, so programs walk several and carry their barrier phases across tiles (with two K/V
    # buffers, alternating between them); on 132 SMs, causal, the second round (whole) runs
    # backwards and the third (partial) forwards again. 640 tokens (five key blocks), packed: q, k
    # and v strided slices of one (batch, seqlen, heads, head_dim) tensor, read through one
    # descriptor each.
    from kernels import _backward, _eager_plan
    from kernels._launch import Tiles
    from kernels.qkv_packed import split_qkv
    tiles = Tiles(64, 128, 4, stages, gluon=True, fused=True, warp_specialized=True,
                  persistent=True, kv_buffers=kv_buffers)
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: tiles)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    if packed:
        qkv = torch.randn(batch, seqlen, 12, head_dim, device="cuda").to(torch.bfloat16)
        q, k, v = (t.detach().requires_grad_() for t in split_qkv(qkv, 4))
    else:
        q, k, v = random_qkv((batch, seqlen, 4, head_dim), (batch, seqlen, 4, head_dim),
                             torch.bfloat16, "cuda")
    fused_pass_matches_reference(q, k, v, causal, _backward.DKDV_WS_PERSISTENT)


@sm90_exactly
@pytest.mark.parametrize("head_dim, stages, kv_buffers, masks",
                         [(128, 2, 1, "drawn in place"), (64, 4, 1, "drawn in place"),
                          (64, 4, 2, "drawn in place"), (128, 2, 1, "mask_partition"),
                          (64, 4, 1, "mask_partition")])
def test_persistent_backward_with_dropout_on_gpu(head_dim, stages, kv_buffers, masks,
                                                 monkeypatch):
    # Each tile's keep-mask from its own (batch, head) counters, by the consumers or by the mask
    # warps: the gradients match float64 under the mask return_debug_mask materializes, with no
    # fallback. 4K tokens: 256 tiles, so programs walk more than one.
    from kernels import _backward, _eager_plan
    from kernels._launch import Tiles
    tiles = Tiles(64, 128, 4, stages, gluon=True, fused=True, warp_specialized=True,
                  persistent=True, kv_buffers=kv_buffers, mask_partition=masks == "mask_partition")
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: tiles)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    for causal in (False, True):
        gluon_kernel_matches_reference_with_dropout(head_dim, causal, _backward.DKDV_WS_PERSISTENT,
                                                    seqlen=4096)


@sm90_exactly
@pytest.mark.parametrize("head_dim, stages", [(128, 2), (64, 4)])
@pytest.mark.parametrize("persistent", [False, True])
def test_dk_and_dv_leave_by_tma_or_from_registers_on_gpu(head_dim, stages, persistent,
                                                         monkeypatch):
    # Either way of storing dK and dV, in either grid, against float64: by TMA from the
    # consumers' staging slots (the default; in the persistent grid a tile's first P waits for the
    # previous tile's dV store), or from registers (register_grads).
    from kernels import _backward, _eager_plan
    from kernels._launch import Tiles
    launcher = _backward.DKDV_WS_PERSISTENT if persistent else _backward.DKDV_WARP_SPECIALIZED
    for register_grads in (False, True):
        tiles = Tiles(64, 128, 4, stages, gluon=True, fused=True, warp_specialized=True,
                      persistent=persistent, register_grads=register_grads)
        monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: tiles)
        monkeypatch.setattr(_eager_plan, "_PLANS", {})
        # 2 x 8 heads x 16 key blocks: more tiles than SMs, so persistent programs take several.
        q, k, v = random_qkv((2, 2048, 8, head_dim), (2, 2048, 8, head_dim), torch.bfloat16,
                             "cuda")
        options = backward_launch_configs(q, k, v, True, 0.0)[1][3]
        assert options.get("TMA_GRADS", False) == (not register_grads)
        fused_pass_matches_reference(q, k, v, True, launcher)


@sm90_exactly
def test_tensors_one_descriptor_cannot_read_take_the_per_key_block_grid():
    # Heads-first tensors (a transposed view): the default at 2K without a mask is the
    # warp-specialized pass with one program per key block, not the persistent one; float64.
    from kernels import _backward
    q, k, v = (torch.randn(2, 4, 2048, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               .requires_grad_() for _ in range(3))
    assert backward_launch_configs(q, k, v, False, 0.0)[1][0] is _backward.DKDV_WARP_SPECIALIZED
    check_against_reference(q, k, v)
