"""GPU-only checks at real sizes: bf16/fp16, sequences up to 16K (64K for memory), head dims 64-256."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from kernels import flash_attention
from kernels._philox import effective_dropout_p

from .numerics import check_against_reference, random_qkv

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("seqlen", [1000, 4096, 16384])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_at_scale(dtype, head_dim, seqlen, causal):
    heads_q = 2 if seqlen <= 4096 else 1     # the float64 reference holds N x N per head
    q, k, v = random_qkv((1, seqlen, heads_q, head_dim), (1, seqlen, 1, head_dim), dtype, "cuda")
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_dropout_matches_reference_on_gpu(head_dim):
    q, k, v = random_qkv((2, 1024, 4, head_dim), (2, 1024, 2, head_dim), torch.bfloat16, "cuda")
    torch.manual_seed(123)
    _, keep = flash_attention(q, k, v, causal=True, dropout_p=0.1, return_debug_mask=True)
    kept, p = keep.float().mean().item(), effective_dropout_p(0.1)    # 26/256
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / keep.numel()) ** 0.5
    torch.manual_seed(123)
    check_against_reference(q, k, v, causal=True, dropout_p=0.1, dropout_mask=keep)


def test_cuda_generator_offset_advances_and_checkpoint_replays():
    q, k, v = random_qkv((1, 512, 4, 64), (1, 512, 4, 64), torch.bfloat16, "cuda")
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    torch.manual_seed(0)
    before = generator.get_offset()
    flash_attention(q, k, v, dropout_p=0.1)
    assert generator.get_offset() > before
    grad_out = torch.randn_like(q)
    torch.manual_seed(7)
    plain = torch.autograd.grad(flash_attention(q, k, v, dropout_p=0.1), (q, k, v), grad_out)
    torch.manual_seed(7)
    replayed = torch.autograd.grad(
        checkpoint(lambda q, k, v: flash_attention(q, k, v, dropout_p=0.1), q, k, v,
                   use_reentrant=False), (q, k, v), grad_out)
    assert all(torch.equal(a, b) for a, b in zip(plain, replayed))


def test_64k_tokens_forward_backward_in_linear_memory():
    seqlen, heads, head_dim = 65536, 16, 64
    q, k, v = random_qkv((1, seqlen, heads, head_dim), (1, seqlen, heads, head_dim), torch.bfloat16,
                         "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    out = flash_attention(q, k, v, causal=True)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - baseline
    tensor_bytes = q.numel() * q.element_size()
    # out, grad_out, dq, dk, dv, lse and delta: a handful of (N, H, D) tensors, never N x N
    # (which would be 65536^2 * 16 heads * 2 bytes = 137 GB).
    assert extra < 8 * tensor_bytes, f"{extra / 2**30:.2f} GiB extra"
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window", [(255, 0), (1000, 0), (300, 77)])
def test_window_matches_reference_on_gpu(head_dim, window):
    causal = window[1] == 0
    q, k, v = random_qkv((1, 4096, 4, head_dim), (1, 4096, 2, head_dim), torch.bfloat16, "cuda")
    check_against_reference(q, k, v, causal=causal, window=window)


def test_window_with_dropout_and_varlen_on_gpu():
    cu_seqlens = torch.tensor([0, 1000, 1001, 3000], dtype=torch.int32, device="cuda")
    q, k, v = random_qkv((3000, 4, 64), (3000, 1, 64), torch.bfloat16, "cuda")
    torch.manual_seed(9)
    _, keep = flash_attention(q, k, v, causal=True, window=(200, 0), dropout_p=0.1, cu_seqlens=cu_seqlens,
                              max_seqlen=1999, return_debug_mask=True)
    torch.manual_seed(9)
    check_against_reference(q, k, v, causal=True, window=(200, 0), dropout_p=0.1, dropout_mask=keep,
                            cu_seqlens=cu_seqlens, max_seqlen=1999)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="the Hopper kernel needs sm_90 or later")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_kernels_on_gpu(head_dim, causal, monkeypatch):
    # The TMA, warp-specialized forward, dQ and dK/dV at real tile sizes, through flash_attention (eager
    # launch plans: the second call runs the bound kernels with their own scratch) and under
    # activation checkpointing (the recomputed forward runs in the autograd engine's thread).
    from kernels import _backward, _eager_plan, _forward
    from kernels._launch import Tiles
    monkeypatch.setattr(_forward, "forward_tiles", lambda *args: Tiles(128, 64, 4, 2, True))
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args: Tiles(64, 128, 4, 2, True))
    monkeypatch.setattr(_backward, "dq_tiles", lambda *args: Tiles(128, 64, 4, 2, True))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})     # plans keep their kernels: none from before
    q, k, v = random_qkv((2, 1000, 4, head_dim), (2, 1000, 4, head_dim), torch.bfloat16, "cuda")
    check_against_reference(q, k, v, causal=causal)
    _forward.FORWARD_HOPPER.compiled.clear()
    _backward.DKDV_HOPPER.compiled.clear()
    _backward.DQ_HOPPER.compiled.clear()
    _eager_plan._PLANS.clear()
    grad_out = torch.randn_like(q)
    first, second = (torch.autograd.grad(flash_attention(q, k, v, causal=causal), (q, k, v), grad_out)
                     for _ in range(2))
    assert all(len(launcher.compiled) == 1 for launcher in
               (_forward.FORWARD_HOPPER, _backward.DQ_HOPPER, _backward.DKDV_HOPPER))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    plain = first
    replayed = torch.autograd.grad(
        checkpoint(lambda q, k, v: flash_attention(q, k, v, causal=causal), q, k, v,
                   use_reentrant=False), (q, k, v), grad_out)
    assert all(torch.equal(a, b) for a, b in zip(plain, replayed))


def test_hopper_kernels_only_where_they_compile():
    # float32 (tf32x3 products) does not specialize: the portable kernels run it.
    from kernels import _hopper
    half = torch.zeros(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    single = half.float()
    sm90 = torch.cuda.get_device_capability() >= (9, 0)
    assert _hopper.supported((half, half, half), varlen=False) == sm90
    assert not _hopper.supported((single, single, single), varlen=False)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="the Hopper kernel needs sm_90 or later")
def test_hopper_forward_with_dropout_on_gpu(monkeypatch):
    # A 64-row query tile (one consumer warpgroup) takes dropout in the forward and dQ; the same
    # mask as the portable kernels, so the portable dK/dV pass agrees with them.
    from kernels import _backward, _eager_plan, _forward
    from kernels._launch import Tiles
    monkeypatch.setattr(_forward, "forward_tiles", lambda *args: Tiles(64, 64, 4, 2, True))
    monkeypatch.setattr(_backward, "dq_tiles", lambda *args: Tiles(64, 64, 4, 2, True))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    q, k, v = random_qkv((2, 1000, 4, 128), (2, 1000, 4, 128), torch.bfloat16, "cuda")
    torch.manual_seed(3)
    _, keep = flash_attention(q, k, v, causal=True, dropout_p=0.1, return_debug_mask=True)
    _forward.FORWARD_HOPPER.compiled.clear()
    _backward.DQ_HOPPER.compiled.clear()
    torch.manual_seed(3)
    check_against_reference(q, k, v, causal=True, dropout_p=0.1, dropout_mask=keep)
    assert len(_forward.FORWARD_HOPPER.compiled) == 1 and len(_backward.DQ_HOPPER.compiled) == 1
