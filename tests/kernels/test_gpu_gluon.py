"""GPU-only checks of the Gluon kernels for sm_90 (_forward_gluon.py, _dq_gluon.py, _dkdv_gluon.py,
_philox_gluon.py): numerics against float64 at real sizes, the calls each one takes, and that the
dropout they apply is the portable kernels' mask."""

import pytest
import torch

from kernels import flash_attention

from .numerics import backward_launch_configs, check_against_reference, random_qkv
from .test_gpu import sm90_exactly

pytestmark = pytest.mark.gpu


@sm90_exactly
@pytest.mark.parametrize("block_m, block_n, warps", [(64, 64, 4), (128, 64, 8), (64, 128, 4)])
@pytest.mark.parametrize("offset", [0, 12 * 2**32 + 4])
def test_gluon_keep_mask_equals_the_portable_kernels(block_m, block_n, warps, offset):
    # The mask the Gluon passes would apply is the one every other kernel regenerates, bit for bit;
    # the large offset puts counters past 2**32 (the high counter word).
    from kernels import _debug_mask, _philox_gluon
    from kernels._launch import Geometry
    geometry = Geometry(2, 3, 3, 256, 384, 64, varlen=False)
    for threshold in (26, 128):
        portable = _debug_mask.keep_mask(geometry, 1234, offset, threshold, torch.device("cuda"))
        gluon = _philox_gluon.keep_mask(geometry, 1234, offset, threshold, torch.device("cuda"),
                                        block_m, block_n, warps)
        assert torch.equal(gluon, portable)
        assert 0.3 < portable.float().mean().item() < 0.95


GLUON_TILES = [(64, (128, 128, 8, 3)), (64, (64, 64, 4, 3)), (128, (128, 64, 8, 3)),
               (128, (128, 128, 8, 2))]
GLUON_LENGTHS = [(1024, 4), (4096, 2), (1088, 4)]


def check_default_forward(q, k, v, causal, launcher):
    """The default forward of this call is ``launcher``'s kernel; through flash_attention it
    matches float64, and the launch plan's second call (bound kernel, its own descriptor scratch)
    gives the first call's result."""
    from kernels import _forward
    from kernels._launch import call_geometry
    geometry = call_geometry(q, k, None, 0)
    out, lse = _forward.new_outputs(q, geometry)
    assert _forward.launch_config(q, k, v, out, lse, geometry, 0.1, causal, 0.0)[0] is launcher
    check_against_reference(q, k, v, causal=causal)
    first, second = (flash_attention(q, k, v, causal=causal) for _ in range(2))
    assert torch.equal(first, second)


@sm90_exactly
@pytest.mark.parametrize("head_dim, tiles, seqlen, heads_k", [
    (head_dim, tiles, seqlen, heads_k) for head_dim, tiles in GLUON_TILES for seqlen, heads_k in GLUON_LENGTHS
    if seqlen % tiles[1] == 0])     # whole key blocks: other lengths run the portable kernel
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_forward_on_gpu(head_dim, tiles, seqlen, heads_k, causal, monkeypatch):
    # Against float64, through flash_attention (the backward is portable); GQA; a length that is
    # a whole number of key blocks but not of query blocks (1088 = 17 x 64); the causal mask's
    # diagonal blocks; the launch plan's second call (bound kernel, its own descriptor scratch)
    # gives the same result.
    from kernels import _eager_plan, _forward
    from kernels._launch import Tiles
    gluon = Tiles(*tiles, gluon=True)
    monkeypatch.setattr(_forward, "default_tiles", lambda *args: gluon)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    q, k, v = random_qkv((2, seqlen, 4, head_dim), (2, seqlen, heads_k, head_dim), torch.bfloat16, "cuda")
    check_default_forward(q, k, v, causal, _forward.FORWARD_GLUON)


@sm90_exactly
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gluon_tiles_leave_other_calls_to_the_portable_kernel(dropout_p, monkeypatch):
    # Gluon tiles as the default for every call: those the schedule does not cover run the
    # portable kernel (default_tiles trusts only tiles it has checked against the call).
    from kernels import _eager_plan, _forward
    from kernels._launch import Tiles, call_geometry
    monkeypatch.setattr(_forward, "gluon_forward_tiles", lambda *args: Tiles(128, 64, 8, 3, gluon=True))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    for seqlen_q, seqlen_k, causal in ((1000, 1000, False), (1000, 1000, True),   # ragged key block
                                       (512, 1024, True)):                        # causal, Nq != Nk
        q, k, v = random_qkv((2, seqlen_q, 4, 128), (2, seqlen_k, 4, 128), torch.bfloat16, "cuda")
        geometry = call_geometry(q, k, None, 0)
        out, lse = _forward.new_outputs(q, geometry)
        assert _forward.launch_config(q, k, v, out, lse, geometry, 0.1, causal, dropout_p)[0] is _forward.FORWARD
        torch.manual_seed(3)
        _, keep = flash_attention(q, k, v, causal=causal, dropout_p=dropout_p, return_debug_mask=True)
        torch.manual_seed(3)
        check_against_reference(q, k, v, causal=causal, dropout_p=dropout_p,
                                dropout_mask=keep if dropout_p else None)


def gluon_backward_pass_matches_reference(q, k, v, causal, launcher):
    """Without dropout: the Gluon backward pass ``launcher`` (tiles patched by the caller) is chosen,
    the gradients match float64, and the launch plan's second call gives the same gradients."""
    from kernels import _backward, _forward
    from kernels._launch import call_geometry
    geometry = call_geometry(q, k, None, 0)
    out, lse = _forward.new_outputs(q, geometry)
    grad_out = torch.randn_like(q)
    configs = _backward.launch_configs(grad_out, q, k, v, out, lse, *_backward.new_gradients(q, k, v, lse)[1:],
                                       geometry, 0.1, causal, 0.0)
    assert launcher in (configs[0][0], configs[1][0])
    check_against_reference(q, k, v, causal=causal)
    first, second = (torch.autograd.grad(flash_attention(q, k, v, causal=causal), (q, k, v), grad_out)
                     for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


GLUON_DKDV_TILES = [(64, (32, 128, 8, 3)), (64, (64, 128, 8, 3)), (64, (32, 64, 4, 3)),
                    (128, (32, 128, 8, 3)), (128, (32, 64, 4, 4))]


@sm90_exactly
@pytest.mark.parametrize("head_dim, tiles", GLUON_DKDV_TILES)
@pytest.mark.parametrize("seqlen", [1024, 4096])
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_dkdv_on_gpu(head_dim, tiles, seqlen, causal, monkeypatch):
    # Gradients against float64 through flash_attention (forward and dQ portable); the causal
    # mask's diagonal blocks; the launch plan's second call gives the same gradients.
    from kernels import _backward, _eager_plan
    from kernels._launch import Tiles
    gluon = Tiles(*tiles, gluon=True)
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: gluon)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    q, k, v = random_qkv((2, seqlen, 4, head_dim), (2, seqlen, 4, head_dim), torch.bfloat16, "cuda")
    gluon_backward_pass_matches_reference(q, k, v, causal, _backward.DKDV_GLUON)


# Tiles the dropout variant compiles without spilling (test_gluon_backward.py), and one that spills.
GLUON_DKDV_DROPOUT_TILES = [(64, (32, 128, 8, 3)), (128, (32, 128, 8, 3)), (128, (32, 64, 4, 3))]


def gluon_kernel_matches_reference_with_dropout(head_dim, causal, launcher, seqlen=1024):
    """The Gluon kernel ``launcher`` (tiles patched by the caller) is chosen for the call, compiles
    and runs (no silent fallback to the portable kernel), and the output and gradients match
    float64 under the mask return_debug_mask materializes: it regenerates the portable mask.
    Two sequences of ``seqlen`` tokens, four heads."""
    from kernels import _backward, _forward, _hopper
    from kernels._launch import call_geometry
    q, k, v = random_qkv((2, seqlen, 4, head_dim), (2, seqlen, 4, head_dim), torch.bfloat16, "cuda")
    geometry = call_geometry(q, k, None, 0)
    out, lse = _forward.new_outputs(q, geometry)
    configs = _backward.launch_configs(torch.empty_like(q), q, k, v, out, lse,
                                       *_backward.new_gradients(q, k, v, lse)[1:], geometry, 0.1,
                                       causal, 0.1)
    chosen = (_forward.launch_config(q, k, v, out, lse, geometry, 0.1, causal, 0.1)[0],
              configs[0][0], configs[1][0])
    assert launcher in chosen
    fallbacks = len(_hopper.FALLBACKS)
    torch.manual_seed(9)
    _, keep = flash_attention(q, k, v, causal=causal, dropout_p=0.1, return_debug_mask=True)
    torch.manual_seed(9)
    check_against_reference(q, k, v, causal=causal, dropout_p=0.1, dropout_mask=keep)
    assert len(_hopper.FALLBACKS) == fallbacks


@sm90_exactly
@pytest.mark.parametrize("head_dim, tiles", [(64, (64, 64, 4, 3)), (128, (64, 64, 4, 3)),
                                             (128, (128, 128, 8, 2))])
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_forward_with_dropout_on_gpu(head_dim, tiles, causal, monkeypatch):
    # The gradients come from the portable backward, which reads this kernel's lse.
    from kernels import _eager_plan, _forward
    from kernels._launch import Tiles
    monkeypatch.setattr(_forward, "default_tiles", lambda *args: Tiles(*tiles, gluon=True))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    gluon_kernel_matches_reference_with_dropout(head_dim, causal, _forward.FORWARD_GLUON)


@sm90_exactly
@pytest.mark.parametrize("head_dim, tiles", GLUON_DKDV_DROPOUT_TILES)
@pytest.mark.parametrize("mask_layout", ["untransposed", "broadcast"])
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_dkdv_with_dropout_on_gpu(head_dim, tiles, mask_layout, causal, monkeypatch):
    from kernels import _backward, _eager_plan
    from kernels._launch import Tiles
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: Tiles(*tiles, gluon=True))
    monkeypatch.setattr(_backward, "DKDV_MASK_LAYOUT", mask_layout)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    gluon_kernel_matches_reference_with_dropout(head_dim, causal, _backward.DKDV_GLUON)


@sm90_exactly
@pytest.mark.parametrize("head_dim, tiles", [(64, (64, 64, 4, 3)), (128, (64, 64, 4, 3)),
                                             (128, (128, 64, 8, 3))])
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_dq_with_dropout_on_gpu(head_dim, tiles, causal, monkeypatch):
    # The dQ pass also writes δ, which the (portable) dK/dV pass reads.
    from kernels import _backward, _eager_plan
    from kernels._launch import Tiles
    monkeypatch.setattr(_backward, "dq_tiles", lambda *args: Tiles(*tiles, gluon=True))
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: Tiles(64, 64, 4, 3))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    gluon_kernel_matches_reference_with_dropout(head_dim, causal, _backward.DQ_GLUON)


@sm90_exactly
def test_gluon_kernels_read_a_device_seed_like_the_portable_ones():
    # The seed CUDA graphs use (drawn on the device, read from memory): the Gluon forward and
    # backward passes and the portable ones give the same output and gradients for it, so they
    # apply the same mask.
    from kernels import _backward, _forward, _hopper
    from kernels._launch import Tiles, call_geometry
    from kernels._philox import device_seed
    q, k, v = (t.detach() for t in random_qkv((2, 1024, 4, 64), (2, 1024, 4, 64), torch.bfloat16,
                                              "cuda"))
    grad_out = torch.randn_like(q)
    geometry = call_geometry(q, k, None, 0)
    seed = device_seed(q.device)
    args = dict(geometry=geometry, softmax_scale=0.125, causal=True, dropout_p=0.1, seed=seed,
                offset=0)
    out, lse = _forward.forward(q, k, v, None, **args)
    fallbacks = len(_hopper.FALLBACKS)
    for tiles in (Tiles(64, 64, 4, 3, gluon=True), Tiles(128, 128, 4, 3, gluon=True, pingpong=True)):
        gluon_out, gluon_lse = _forward.forward(q, k, v, None, tiles=tiles, **args)
        assert ((gluon_out.float() - out.float()).norm() / out.float().norm()).item() < 8e-3
        torch.testing.assert_close(gluon_lse, lse, rtol=1e-4, atol=1e-4)
    portable = _backward.backward(grad_out, q, k, v, out, lse, None,
                                  tiles=(Tiles(64, 64, 4, 3), Tiles(64, 64, 4, 3)), **args)
    # The two-pass Gluon backward, and the warp-specialized fused pass (with the portable
    # delta-only pass).
    for tiles in [(Tiles(32, 128, 8, 3, gluon=True), Tiles(64, 64, 4, 3, gluon=True)),
                  (Tiles(64, 128, 4, 4, gluon=True, fused=True, warp_specialized=True),
                   Tiles(64, 64, 4, 3))]:
        gluon = _backward.backward(grad_out, q, k, v, out, lse, None, tiles=tiles, **args)
        assert len(_hopper.FALLBACKS) == fallbacks   # the Gluon passes compiled and ran
        for mine, theirs in zip(gluon, portable):
            assert ((mine.float() - theirs.float()).norm() / theirs.float().norm()).item() < 8e-3


GLUON_DQ_TILES = [(64, (64, 64, 4, 3)), (64, (128, 64, 8, 3)), (128, (64, 64, 4, 3)),
                  (128, (128, 64, 8, 3)), (128, (64, 32, 4, 3))]


@sm90_exactly
@pytest.mark.parametrize("head_dim, tiles", GLUON_DQ_TILES)
@pytest.mark.parametrize("seqlen, heads_k", [(1024, 4), (4096, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_dq_on_gpu(head_dim, tiles, seqlen, heads_k, causal, monkeypatch):
    # Gradients against float64 through flash_attention (δ from this pass feeds the portable
    # dK/dV); GQA; the causal mask's diagonal blocks; the launch plan's second call.
    from kernels import _backward, _eager_plan
    from kernels._launch import Tiles
    monkeypatch.setattr(_backward, "dq_tiles", lambda *args: Tiles(*tiles, gluon=True))
    # The two-pass dK/dV tiles (the deterministic ones): a fused default would compute dQ itself.
    two_pass = _backward.dkdv_tiles
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: two_pass(*args, **{**kwargs, "deterministic": True}))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    q, k, v = random_qkv((2, seqlen, 4, head_dim), (2, seqlen, heads_k, head_dim), torch.bfloat16, "cuda")
    gluon_backward_pass_matches_reference(q, k, v, causal, _backward.DQ_GLUON)


@sm90_exactly
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_backward_both_passes_on_gpu(head_dim, causal, monkeypatch):
    from kernels import _backward, _eager_plan
    from kernels._launch import Tiles
    monkeypatch.setattr(_backward, "dq_tiles", lambda *args: Tiles(64, 64, 4, 3, gluon=True))
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: Tiles(32, 128, 8, 3, gluon=True))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    q, k, v = random_qkv((2, 2048, 4, head_dim), (2, 2048, 4, head_dim), torch.bfloat16, "cuda")
    check_against_reference(q, k, v, causal=causal)


@sm90_exactly
def test_gluon_dkdv_tiles_leave_other_calls_to_the_portable_kernel(monkeypatch):
    from kernels import _backward, _eager_plan, _forward
    from kernels._launch import Tiles, call_geometry
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: Tiles(32, 128, 8, 3, gluon=True))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    for seqlen_q, seqlen_k, heads_k, causal in ((1000, 1000, 4, False),    # ragged blocks
                                                (1024, 1024, 2, False),    # GQA
                                                (512, 1024, 4, True)):     # causal, Nq != Nk
        q, k, v = random_qkv((2, seqlen_q, 4, 128), (2, seqlen_k, heads_k, 128), torch.bfloat16, "cuda")
        geometry = call_geometry(q, k, None, 0)
        out, lse = _forward.new_outputs(q, geometry)
        configs = _backward.launch_configs(torch.randn_like(q), q, k, v, out, lse,
                                           *_backward.new_gradients(q, k, v, lse)[1:], geometry, 0.1,
                                           causal, 0.0)
        assert configs[1][0] is _backward.DKDV
        check_against_reference(q, k, v, causal=causal)


@sm90_exactly
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_default_kernels_in_float16_on_gpu(head_dim, dropout_p):
    # The other GPU tests of the Gluon kernels run bf16; fp16 takes the same defaults.
    from kernels import _backward, _forward
    from kernels._launch import call_geometry
    q, k, v = random_qkv((2, 1024, 4, head_dim), (2, 1024, 4, head_dim), torch.float16, "cuda")
    geometry = call_geometry(q, k, None, 0)
    out, lse = _forward.new_outputs(q, geometry)
    for causal in (False, True):
        forward = _forward.launch_config(q, k, v, out, lse, geometry, 0.1, causal, dropout_p)[0]
        backward = [config[0] for config in _backward.launch_configs(
            torch.randn_like(q), q, k, v, out, lse, *_backward.new_gradients(q, k, v, lse)[1:],
            geometry, 0.1, causal, dropout_p)]
        gluon_forward = dropout_p > 0 and (head_dim == 128 or not causal)
        assert (forward is _forward.FORWARD_GLUON) == gluon_forward
        # 1K tokens: the ping-pong forward but at head dim 64 causal; the persistent backward
        # (with dropout at head dim 128 causal too since attention_notes v38).
        pingpong = not dropout_p and (head_dim == 128 or not causal)
        assert (forward is _forward.FORWARD_PINGPONG) == pingpong
        assert backward[1] is _backward.DKDV_WS_PERSISTENT
        if not dropout_p:
            check_against_reference(q, k, v, causal=causal)
            continue
        torch.manual_seed(9)
        _, keep = flash_attention(q, k, v, causal=causal, dropout_p=dropout_p, return_debug_mask=True)
        torch.manual_seed(9)
        check_against_reference(q, k, v, causal=causal, dropout_p=dropout_p, dropout_mask=keep)


# The Gluon fused pass (ACCUMULATE_DQ): the spill-free 32-query head-dim-64 tile and two at 128
# (they spill 88-368 bytes when compiled for sm_90), and the 64-query tiles whose blocks run in turn
# (64x64x4x3 was the default at head dim 64 for long calls, until v21 without dropout and v22
# with), all causal or not, with or without dropout, except 32x128x8 causal without dropout, on
# which ptxas crashes
# (attention_notes.md; the library would warn and run the portable pass).
GLUON_FUSED_CASES = [(head_dim, tiles, causal, dropout_p)
                     for head_dim, tiles in [(64, (32, 64, 4, 3)), (128, (32, 64, 4, 4)),
                                             (128, (32, 128, 8, 3)), (64, (64, 64, 4, 3)),
                                             (128, (64, 128, 8, 2))]
                     for causal in (False, True) for dropout_p in (0.0, 0.1)
                     if not (tiles == (32, 128, 8, 3) and causal and not dropout_p)]


def fused_pass_matches_reference(q, k, v, causal, launcher):
    """Without dropout: the fused dK/dV pass ``launcher`` (tiles patched by the caller) is chosen
    and adds dQ, δ comes from the portable delta-only pass, it compiles and runs (no fallback to
    the portable pass), and the gradients match float64."""
    from kernels import _backward, _hopper
    dq_config, dkdv_config = backward_launch_configs(q, k, v, causal, 0.0)
    assert dkdv_config[0] is launcher and dkdv_config[3]["ACCUMULATE_DQ"]
    assert dq_config[0] is _backward.DQ and dq_config[3]["DELTA_ONLY"]
    fallbacks = len(_hopper.FALLBACKS)
    check_against_reference(q, k, v, causal=causal)
    assert len(_hopper.FALLBACKS) == fallbacks


@sm90_exactly
@pytest.mark.parametrize("head_dim, tiles, causal, dropout_p", GLUON_FUSED_CASES)
def test_gluon_fused_backward_on_gpu(head_dim, tiles, causal, dropout_p, monkeypatch):
    # dK, dV and (by the copy engine's reduce-adds) dQ from the Gluon pass, δ from the portable
    # delta-only pass; against float64, under the call's own mask with dropout. Not compared
    # across calls: the adds make dQ's rounding depend on the order blocks finish.
    from kernels import _backward, _eager_plan
    from kernels._launch import Tiles
    monkeypatch.setattr(_backward, "dkdv_tiles",
                        lambda *args, **kwargs: Tiles(*tiles, gluon=True, fused=True))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    if dropout_p:
        gluon_kernel_matches_reference_with_dropout(head_dim, causal, _backward.DKDV_GLUON)
        return
    q, k, v = random_qkv((2, 1024, 4, head_dim), (2, 1024, 4, head_dim), torch.bfloat16, "cuda")
    fused_pass_matches_reference(q, k, v, causal, _backward.DKDV_GLUON)
