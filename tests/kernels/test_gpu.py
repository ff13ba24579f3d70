"""GPU-only checks at real sizes: bf16/fp16, sequences up to 16K (64K for memory), head dims 64-256."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from kernels import flash_attention
from kernels._philox import effective_dropout_p

from .numerics import (backward_launch_configs, check_against_reference,
                       check_dropout_against_reference, random_qkv)

pytestmark = pytest.mark.gpu


def bf16_call_and_outputs(head_dim):
    """q, k, v (2 x 1024 tokens, 4 heads, bf16), their call geometry and forward output buffers:
    the call the default-kernel tests ask the launchers about."""
    from kernels import _forward
    from kernels._launch import call_geometry
    q, k, v = random_qkv((2, 1024, 4, head_dim), (2, 1024, 4, head_dim), torch.bfloat16, "cuda")
    geometry = call_geometry(q, k, None, 0)
    return (q, k, v, geometry, *_forward.new_outputs(q, geometry))


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
    # Deterministic algorithms: the default backward here (head dim 64 with dropout) is the fused
    # pass, whose dQ sums by atomic adds in no fixed order; the two-pass backward is bitwise
    # reproducible, so any difference below is the dropout mask not being replayed.
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(7)
        plain = torch.autograd.grad(flash_attention(q, k, v, dropout_p=0.1), (q, k, v), grad_out)
        torch.manual_seed(7)
        replayed = torch.autograd.grad(
            checkpoint(lambda q, k, v: flash_attention(q, k, v, dropout_p=0.1), q, k, v,
                       use_reentrant=False), (q, k, v), grad_out)
    finally:
        torch.use_deterministic_algorithms(False)
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


sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                          reason="the TMA forward needs sm_90 or later")


@sm90
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_tma_forward_on_gpu(head_dim, causal, monkeypatch):
    # The TMA forward at a real tile size with every tile masked (ragged keys, causal), through
    # flash_attention (eager launch plans: the second call runs the bound kernel with its own
    # descriptor scratch) and under activation checkpointing (the recomputed forward runs in the
    # autograd engine's thread).
    from kernels import _eager_plan, _forward
    from kernels._launch import Tiles
    monkeypatch.setattr(_forward, "default_tiles", lambda *args: Tiles(128, 64, 4, 2, tma=True))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})     # plans keep their kernels: none from before
    q, k, v = random_qkv((2, 1000, 4, head_dim), (2, 1000, 4, head_dim), torch.bfloat16, "cuda")
    check_against_reference(q, k, v, causal=causal)
    _forward.FORWARD_TMA.compiled.clear()
    _eager_plan._PLANS.clear()
    grad_out = torch.randn_like(q)
    first, second = (torch.autograd.grad(flash_attention(q, k, v, causal=causal), (q, k, v), grad_out)
                     for _ in range(2))
    assert len(_forward.FORWARD_TMA.compiled) == 1
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    replayed = torch.autograd.grad(
        checkpoint(lambda q, k, v: flash_attention(q, k, v, causal=causal), q, k, v,
                   use_reentrant=False), (q, k, v), grad_out)
    assert all(torch.equal(a, b) for a, b in zip(first, replayed))


@sm90
@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_forward_is_the_fastest_measured_kernel(head_dim):
    # 1024 tokens. Without dropout, ping-pong on sm_90 (elsewhere TMA at head dim 128 without a
    # mask, else portable), but at head dim 64 causal: portable (ping-pong from 2048 tokens).
    # With dropout on sm_90: Gluon at head dim 128, and at 64 without a mask.
    from kernels import _forward
    q, k, v, geometry, out, lse = bf16_call_and_outputs(head_dim)
    config = lambda causal, p=0.0: _forward.launch_config(q, k, v, out, lse, geometry, 0.1, causal, p)[0]
    sm90_exactly = torch.cuda.get_device_capability()[0] == 9
    no_mask_128 = _forward.FORWARD_PINGPONG if sm90_exactly else _forward.FORWARD_TMA
    assert config(False) is (no_mask_128 if head_dim == 128 else _forward.FORWARD_PINGPONG
                             if sm90_exactly else _forward.FORWARD)
    gluon_or_portable = lambda gluon: _forward.FORWARD_GLUON if gluon and sm90_exactly else _forward.FORWARD
    assert config(True) is (_forward.FORWARD_PINGPONG if head_dim == 128 and sm90_exactly
                            else _forward.FORWARD)
    assert config(False, 0.1) is gluon_or_portable(True)
    assert config(True, 0.1) is gluon_or_portable(head_dim == 128)
    for causal in (False, True):
        check_against_reference(q, k, v, causal=causal)
        check_dropout_against_reference(q, k, v, causal, 0.1)


@sm90
def test_head_dim_64_causal_runs_the_ping_pong_forward_from_2048_tokens():
    # The rule's edge (attention_notes v31): portable at 1024 queries, ping-pong at 2048, whose
    # 192-row tiles leave a partial last tile (2048 = 10 x 192 + 128), against float64.
    from kernels import _forward
    from kernels._launch import call_geometry
    sm90_exactly = torch.cuda.get_device_capability()[0] == 9
    for seqlen, expected in [(1024, _forward.FORWARD), (2048, _forward.FORWARD_PINGPONG)]:
        shape = (2, seqlen, 4, 64)
        q, k, v = random_qkv(shape, shape, torch.bfloat16, "cuda")
        geometry = call_geometry(q, k, None, 0)
        chosen = _forward.launch_config(q, k, v, *_forward.new_outputs(q, geometry), geometry,
                                        0.125, True, 0.0)[0]
        assert chosen is (expected if sm90_exactly else _forward.FORWARD)
        check_against_reference(q, k, v, causal=True)


def test_tma_forward_only_where_it_compiles():
    # float32 (tf32x3 products) runs the portable kernel.
    from kernels import _hopper
    half = torch.zeros(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
    single = half.float()
    sm90 = torch.cuda.get_device_capability() >= (9, 0)
    assert _hopper.supported((half, half, half), varlen=False) == sm90
    assert not _hopper.supported((single, single, single), varlen=False)


@sm90
def test_tma_forward_with_dropout_on_gpu(monkeypatch):
    # The same mask as the portable kernel, so the portable backward differentiates it.
    from kernels import _eager_plan, _forward
    from kernels._launch import Tiles
    monkeypatch.setattr(_forward, "default_tiles", lambda *args: Tiles(128, 64, 4, 2, tma=True))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    q, k, v = random_qkv((2, 1000, 4, 128), (2, 1000, 4, 128), torch.bfloat16, "cuda")
    torch.manual_seed(3)
    _, keep = flash_attention(q, k, v, causal=True, dropout_p=0.1, return_debug_mask=True)
    _forward.FORWARD_TMA.compiled.clear()
    _eager_plan._PLANS.clear()     # else the first call's plan runs its kernel, compiling nothing
    torch.manual_seed(3)
    check_against_reference(q, k, v, causal=True, dropout_p=0.1, dropout_mask=keep)
    assert len(_forward.FORWARD_TMA.compiled) == 1


sm90_exactly = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                                  reason="the Gluon kernels' warpgroup MMAs are sm_90's")


@sm90_exactly
@pytest.mark.parametrize("head_dim, causal", [(128, False), (128, True), (64, False), (64, True)])
def test_short_calls_take_the_hopper_kernels_from_512_tokens(head_dim, causal):
    # The rules' edge (attention_notes v32): at 256 queries the previous defaults, at 512 the
    # ping-pong forward (head dim 64: without a mask only) and the persistent backward, with
    # dropout too where it won there (without a mask); against float64.
    from kernels import _backward, _forward
    from kernels._launch import call_geometry
    below = {(128, False): _forward.FORWARD_TMA, (128, True): _forward.FORWARD_GLUON}
    for seqlen in (256, 512):
        shape = (2, seqlen, 4, head_dim)
        q, k, v = random_qkv(shape, shape, torch.bfloat16, "cuda")
        geometry = call_geometry(q, k, None, 0)
        out, lse = _forward.new_outputs(q, geometry)
        forward = _forward.launch_config(q, k, v, out, lse, geometry, 0.125, causal, 0.0)[0]
        pingpong = seqlen == 512 and not (head_dim == 64 and causal)
        assert forward is (_forward.FORWARD_PINGPONG if pingpong
                           else below.get((head_dim, causal), _forward.FORWARD))
        for dropout_p in (0.0, 0.1):
            dkdv = _backward.launch_configs(torch.randn_like(q), q, k, v, out, lse,
                                            *_backward.new_gradients(q, k, v, lse)[1:], geometry,
                                            0.125, causal, dropout_p)[1]
            persistent = seqlen == 512 and (not dropout_p or not causal)
            assert (dkdv[0] is _backward.DKDV_WS_PERSISTENT) == persistent
            if persistent:      # two K/V buffers at head dim 64 without dropout only
                assert dkdv[3]["KV_BUFFERS"] == (2 if head_dim == 64 and not dropout_p else 1)
        check_against_reference(q, k, v, causal=causal)
        check_dropout_against_reference(q, k, v, causal, 0.1)


@sm90_exactly
@pytest.mark.parametrize("head_dim", [64, 128])
def test_default_backward_is_the_fastest_measured_kernel(head_dim):
    # 1K tokens: the warp-specialized fused pass in its persistent grid (its delta-only dQ pass
    # is the portable kernel's), with dropout too (at head dim 128 causal since attention_notes
    # v38; before, the Gluon dK/dV pass after the portable dQ pass).
    from kernels import _backward
    q, k, v, geometry, out, lse = bf16_call_and_outputs(head_dim)
    for causal in (False, True):
        configs = lambda dropout_p: _backward.launch_configs(
            torch.randn_like(q), q, k, v, out, lse, *_backward.new_gradients(q, k, v, lse)[1:],
            geometry, 0.1, causal, dropout_p)
        launchers = lambda dropout_p: [config[0] for config in configs(dropout_p)]
        assert launchers(0.0) == [_backward.DQ, _backward.DKDV_WS_PERSISTENT]
        assert launchers(0.1) == [_backward.DQ, _backward.DKDV_WS_PERSISTENT]
        assert configs(0.1)[1][3]["ACCUMULATE_DQ"]
        check_against_reference(q, k, v, causal=causal)
        check_dropout_against_reference(q, k, v, causal, 0.1)


@sm90_exactly
@pytest.mark.parametrize("seqlen", [2048, 4096])
def test_long_calls_at_head_dim_64_run_the_warp_specialized_pass(seqlen):
    # The warp-specialized pass from 2048 queries on, in its persistent grid without dropout
    # (with the causal mask too) and with dropout without a mask (to 4K) and causal at 2K, else
    # one program per key block: dK, dV and dQ, δ from the portable delta-only pass; against
    # float64.
    from kernels import _backward, _forward
    from kernels._launch import call_geometry
    q, k, v = random_qkv((1, seqlen, 2, 64), (1, seqlen, 2, 64), torch.bfloat16, "cuda")
    geometry = call_geometry(q, k, None, 0)
    out, lse = _forward.new_outputs(q, geometry)
    for causal, dropout_p in [(False, 0.0), (False, 0.1), (True, 0.0), (True, 0.1)]:
        dq, dkdv = _backward.launch_configs(torch.randn_like(q), q, k, v, out, lse,
                                            *_backward.new_gradients(q, k, v, lse)[1:], geometry,
                                            0.125, causal, dropout_p)
        # Up to 8K tokens without dropout (causal: v28); with dropout (v32) to 4K without a
        # mask, to 2K causal.
        persistent = not dropout_p or not causal or seqlen <= 2048
        assert dkdv[0] is (_backward.DKDV_WS_PERSISTENT if persistent else
                           _backward.DKDV_WARP_SPECIALIZED)
        if persistent:      # with two K/V buffers at head dim 64, one with dropout
            assert dkdv[3]["KV_BUFFERS"] == (1 if dropout_p else 2)
        assert dkdv[3]["ACCUMULATE_DQ"] and dq[3]["DELTA_ONLY"]
        if dropout_p:
            check_dropout_against_reference(q, k, v, causal, dropout_p)
        else:
            check_against_reference(q, k, v, causal=causal)


@sm90_exactly
@pytest.mark.parametrize("seqlen", [2048, 4096, 8192, 16384])
def test_head_dim_128_causal_dropout_backward_by_length(seqlen):
    # With dropout and the causal mask the persistent grid won at 2K only (v34: -3.4 %; level at
    # 1K, +1 % at 4K); beyond, one program per key block, with a mask partition at 4K-8K (v35:
    # -3.3 / -2.8 %). Gradients against float64.
    from kernels import _backward
    q, k, v = random_qkv((1, seqlen, 2, 128), (1, seqlen, 2, 128), torch.bfloat16, "cuda")
    dkdv = backward_launch_configs(q, k, v, True, 0.1)[1]
    assert dkdv[0] is (_backward.DKDV_WS_PERSISTENT if seqlen == 2048
                       else _backward.DKDV_WARP_SPECIALIZED)
    if seqlen == 2048:      # one K/V buffer with dropout
        assert dkdv[3]["KV_BUFFERS"] == 1
    assert dkdv[3].get("MASK_PARTITION", False) == (4096 <= seqlen <= 8192)
    check_dropout_against_reference(q, k, v, True, 0.1)


@sm90_exactly
def test_gqa_with_dropout_runs_the_portable_dkdv_tiles():
    # The Gluon dK/dV pass takes one query head per kv-head; the default for GQA is the portable
    # pass with its own dropout tiles, not the Gluon pass's.
    from kernels import _backward, _forward
    from kernels._launch import call_geometry
    q, k, v = random_qkv((2, 1024, 4, 128), (2, 1024, 2, 128), torch.bfloat16, "cuda")
    geometry = call_geometry(q, k, None, 0)
    out, lse = _forward.new_outputs(q, geometry)
    dkdv = _backward.launch_configs(torch.randn_like(q), q, k, v, out, lse,
                                    *_backward.new_gradients(q, k, v, lse)[1:], geometry, 0.1,
                                    True, 0.1)[1]
    assert dkdv[0] is _backward.DKDV and (dkdv[3]["BLOCK_M"], dkdv[3]["BLOCK_N"]) == (128, 64)
    torch.manual_seed(5)
    _, keep = flash_attention(q, k, v, causal=True, dropout_p=0.1, return_debug_mask=True)
    torch.manual_seed(5)
    check_against_reference(q, k, v, causal=True, dropout_p=0.1, dropout_mask=keep)


# Eight of the portable dK/dV tilings tune_attention.py times, the 16-row ones among them, with
# dropout: 16 x 128 gave a wrong dK with the untransposed mask layout (attention_notes.md, v13) and
# now takes the broadcast one.
PORTABLE_DKDV_TILES = [(16, 128, 4, 3), (16, 128, 4, 2), (16, 64, 4, 3), (32, 64, 4, 3),
                       (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 2)]


@pytest.mark.parametrize("tiles", PORTABLE_DKDV_TILES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_every_portable_dkdv_tiling_with_dropout_on_gpu(tiles, causal, monkeypatch):
    from kernels import _backward, _eager_plan
    from kernels._launch import Tiles
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: Tiles(*tiles))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    q, k, v = random_qkv((2, 1024, 4, 64), (2, 1024, 4, 64), torch.bfloat16, "cuda")
    torch.manual_seed(5)
    _, keep = flash_attention(q, k, v, causal=causal, dropout_p=0.1, return_debug_mask=True)
    torch.manual_seed(5)
    check_against_reference(q, k, v, causal=causal, dropout_p=0.1, dropout_mask=keep)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal, dropout_p", [(False, 0.0), (True, 0.0), (True, 0.1)])
def test_fused_backward_on_gpu(head_dim, causal, dropout_p, monkeypatch):
    # The single-pass backward (dQ by atomic adds) at the tiles the tune times, with GQA.
    from kernels import _backward, _eager_plan
    from kernels._launch import Tiles
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: Tiles(64, 64, 4, 3, fused=True))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    q, k, v = random_qkv((1, 4096, 2, head_dim), (1, 4096, 1, head_dim), torch.bfloat16, "cuda")
    if dropout_p:
        torch.manual_seed(3)
        _, keep = flash_attention(q, k, v, causal=causal, dropout_p=dropout_p, return_debug_mask=True)
        torch.manual_seed(3)
        check_against_reference(q, k, v, causal=causal, dropout_p=dropout_p, dropout_mask=keep)
    else:
        check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_qkv_packed_compiled_equals_the_split_views_on_gpu(head_dim, dropout_p):
    # The packed custom ops write dQ, dK, dV into strided slices of one gradient: through the Gluon
    # passes (no dropout, sm_90) and the fused pass (d64 with dropout) as the defaults choose.
    from kernels import flash_attention_qkvpacked
    from kernels.qkv_packed import split_qkv
    qkv = torch.randn(2, 4096, 12, head_dim, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn(2, 4096, 4, head_dim, device="cuda", dtype=torch.bfloat16)
    results = []
    for call in (lambda t: flash_attention_qkvpacked(t, causal=True, dropout_p=dropout_p),
                 lambda t: flash_attention(*split_qkv(t, 4), causal=True, dropout_p=dropout_p)):
        torch._dynamo.reset()
        leaf = qkv.clone().requires_grad_()
        torch.manual_seed(5)
        out = torch.compile(call, backend="aot_eager", fullgraph=True)(leaf)
        out.backward(grad_out)
        results.append((out.float(), leaf.grad.float()))
    torch._dynamo.reset()
    (out, grad), (want_out, want_grad) = results
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    # dQ may differ in its last bits where the fused pass adds it by atomics in any order.
    torch.testing.assert_close(grad, want_grad, rtol=2e-2, atol=2e-2)
