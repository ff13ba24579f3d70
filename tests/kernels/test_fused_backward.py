"""The fused backward (dK/dV tiles marked ``fused``): one pass adds dQ by atomic adds, the dQ pass
computes delta only. The same gradients as the two-pass backward and the float64 reference, for
every kind of call the dK/dV pass serves: causal, GQA, dropout, sliding windows, packed sequences."""

import pytest
import torch

from kernels import _backward, _eager_plan, attention_reference, flash_attention
from kernels._launch import Tiles
from kernels._philox import effective_dropout_p

from .numerics import (assert_gradients_match_float64, backward_launch_configs, outputs_and_grads,
                       random_qkv)


@pytest.fixture
def fused(monkeypatch, device):
    """Run every backward of the test fused, with the device's default tile sizes."""
    default = _backward.dkdv_tiles

    def fused_tiles(*args, **kwargs):
        tiles = default(*args, **kwargs)
        return Tiles(tiles.block_m, tiles.block_n, tiles.num_warps, tiles.num_stages, fused=True)
    monkeypatch.setattr(_backward, "dkdv_tiles", fused_tiles)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})


@pytest.mark.parametrize("causal, window, dropout_p", [(True, None, 0.0), (True, None, 0.2),
                                                       (False, (9, 5), 0.2), (False, None, 0.0),
                                                       (False, None, 0.2)],
                         ids=["causal", "causal-dropout", "window-dropout", "no-mask",
                              "no-mask-dropout"])
def test_fused_backward_matches_the_reference(fused, device, causal, window, dropout_p):
    # GQA (4 query heads on 2 kv-heads), ragged blocks (70 queries on 100 keys). In the
    # interpreter's 16-query, 32-key tiles, without a mask, three key-block programs add dQ into
    # the same four full query blocks, and a fourth, ragged one adds into every row.
    fused_backward_matches_the_reference(device, causal, window, dropout_p)


@pytest.mark.parametrize("causal, dropout_p", [(True, 0.2), (False, 0.0)])
def test_fused_backward_with_torch_mul_finishing_dq_matches_the_reference(fused, device, causal,
                                                                         dropout_p, monkeypatch):
    # dQ scaled out of the float32 sum by torch.mul instead of _finish_dq.py's kernel.
    monkeypatch.setattr(_backward, "FINISH_DQ_KERNEL", False)
    fused_backward_matches_the_reference(device, causal, None, dropout_p)


def fused_backward_matches_the_reference(device, causal, window, dropout_p):
    q, k, v = random_qkv((2, 70, 4, 32), (2, 100, 2, 32), torch.float32, device)
    options = dict(causal=causal, dropout_p=dropout_p, **({"window": window} if window else {}))
    torch.manual_seed(5)
    _, keep = flash_attention(q, k, v, return_debug_mask=True, **options) if dropout_p else (None, None)
    torch.manual_seed(5)
    _, grads, grad_out = outputs_and_grads(lambda q, k, v: flash_attention(q, k, v, **options), q, k, v)
    reference = dict(causal=causal, compute_dtype=torch.float64,
                     **({"window": window} if window else {}),
                     **({"dropout_p": effective_dropout_p(dropout_p), "dropout_mask": keep}
                        if dropout_p else {}))
    _, exact, _ = outputs_and_grads(lambda q, k, v: attention_reference(q, k, v, **reference),
                                    q, k, v, grad_out.double())
    for mine, truth in zip(grads, exact):
        assert (mine.double() - truth).abs().max().item() < 1e-5


def test_fused_backward_on_packed_sequences_equals_two_passes(device, monkeypatch):
    q, k, v = random_qkv((1, 70, 2, 16), (1, 70, 2, 16), torch.float32, device)
    q, k, v = (t[0].detach().requires_grad_() for t in (q, k, v))       # (tokens, heads, dim)
    cu_seqlens = torch.tensor([0, 23, 31, 70], dtype=torch.int32, device=device)
    call = lambda q, k, v: flash_attention(q, k, v, causal=True, cu_seqlens=cu_seqlens, max_seqlen=39)
    _, two_passes, grad_out = outputs_and_grads(call, q, k, v)
    default = _backward.dkdv_tiles
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: Tiles(
        *(getattr(default(*args, **kwargs), f) for f in ("block_m", "block_n", "num_warps", "num_stages")),
        fused=True))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    _, fused_grads, _ = outputs_and_grads(call, q, k, v, grad_out)
    for mine, theirs in zip(fused_grads, two_passes):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_fused_tiles_are_portable_or_gluon():
    with pytest.raises(ValueError, match="fused backward has no TMA kernel"):
        Tiles(64, 64, 4, 3, tma=True, fused=True)
    assert Tiles(32, 64, 4, 3, gluon=True, fused=True).fused     # _dkdv_gluon.py, ACCUMULATE_DQ


def test_gluon_fused_tiles_run_the_portable_fused_pass_without_sm90(device, monkeypatch):
    # Under the interpreter (no Gluon) the tiles' fused form is kept: the portable pass adds dQ.
    q, k, v = random_qkv((1, 64, 2, 64), (1, 64, 2, 64), torch.float32, device)
    monkeypatch.setattr(_backward, "dkdv_tiles",
                        lambda *args, **kwargs: Tiles(16, 32, 1, 3, gluon=True, fused=True))
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    dq_config, dkdv_config = backward_launch_configs(q, k, v, True, 0.0)
    assert dkdv_config[0] is _backward.DKDV and dkdv_config[3]["ACCUMULATE_DQ"]
    assert dq_config[3]["DELTA_ONLY"]
    assert_gradients_match_float64(q, k, v, causal=True)


def test_deterministic_mode_turns_the_default_fused_pass_back_into_two(device, monkeypatch):
    # The default tiles say fused; torch.use_deterministic_algorithms must win over them, since
    # atomic adds make dQ depend on the order the blocks finish.
    default = _backward.dkdv_tiles
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: Tiles(
        *(getattr(default(*args, **kwargs), f) for f in ("block_m", "block_n", "num_warps", "num_stages")),
        fused=True))
    from kernels import _forward
    from kernels._launch import call_geometry
    q, k, v = random_qkv((1, 40, 2, 16), (1, 40, 2, 16), torch.float32, device)
    geometry = call_geometry(q, k, None, 0)
    out, lse = _forward.new_outputs(q, geometry)
    fused_options = lambda: _backward.launch_configs(
        torch.randn_like(q), q, k, v, out, lse, *_backward.new_gradients(q, k, v, lse)[1:], geometry,
        0.25, True, 0.1)[1][3].get("ACCUMULATE_DQ", False)
    assert fused_options()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not fused_options()
    finally:
        torch.use_deterministic_algorithms(deterministic)
