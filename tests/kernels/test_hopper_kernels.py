"""The Hopper kernels (TMA loads, one warp-specialized loop; forward and dK/dV): exact against the
float64 reference and equal to the portable kernels, and chosen only for the calls they support."""

import math

import pytest
import torch

from kernels import _backward, _forward, _hopper, attention_reference
from kernels._launch import Tiles, call_geometry

from .numerics import check_against_reference, random_qkv

pytestmark = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
                                reason="the Hopper kernel needs sm_90 or later")

# Interpreter-sized tiles (a 128-row tile on the GPU); the flag is what selects the kernel.
HOPPER = Tiles(32, 32, 1, 1, warp_specialize=True)
PORTABLE = Tiles(32, 32, 1, 1)

# (batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, causal, window)
CASES = [
    (2, 64, 64, 2, 2, 32, False, (-1, -1)),    # no mask at all: the unmasked loop
    (1, 70, 70, 4, 2, 64, False, (-1, -1)),    # ragged last key block, GQA
    (1, 40, 70, 2, 2, 80, True, (-1, -1)),     # causal, Nq < Nk, head_dim not a power of two
    (1, 70, 40, 2, 1, 16, True, (-1, -1)),     # causal, Nq > Nk: the first 30 queries see nothing
    (1, 90, 90, 1, 1, 32, False, (20, 5)),     # a sliding window on both sides
    (1, 96, 96, 2, 2, 32, True, (33, -1)),     # causal with a left window
]


def _chosen_kernel(q, k, v, causal=False, window=(-1, -1), dropout_p=0.0, tiles=HOPPER):
    geometry = call_geometry(q, k, None, 0)
    out, lse = _forward.new_outputs(q, geometry)
    return _forward.launch_config(q, k, v, out, lse, geometry, 0.1, causal, dropout_p, tiles,
                                  window)[0]


def _forward_pair(q, k, v, causal, window, tiles):
    geometry = call_geometry(q, k, None, 0)
    return _forward.forward(q, k, v, None, geometry, 1 / math.sqrt(q.shape[-1]), causal, 0.0,
                            seed=0, offset=0, tiles=tiles, window=window)


float32_interpreted = pytest.mark.skipif(torch.cuda.is_available(),
                                         reason="float32 runs the portable kernel on the GPU")


@float32_interpreted
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-c{int(c[6])}-w{c[7]}")
def test_hopper_forward_matches_reference_and_portable(case, device):
    batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, causal, window = case
    q, k, v = random_qkv((batch, seqlen_q, heads_q, head_dim), (batch, seqlen_k, heads_k, head_dim),
                         torch.float32, device, requires_grad=False)
    assert _chosen_kernel(q, k, v, causal, window) is _forward.FORWARD_HOPPER
    out, lse = _forward_pair(q, k, v, causal, window, HOPPER)
    exact = attention_reference(q, k, v, causal=causal, compute_dtype=torch.float64,
                                window=None if window == (-1, -1) else window)
    assert (out.double() - exact).abs().max().item() < 1e-5
    portable_out, portable_lse = _forward_pair(q, k, v, causal, window, PORTABLE)
    assert torch.allclose(out, portable_out, rtol=0, atol=1e-6)
    assert torch.allclose(lse, portable_lse, rtol=0, atol=1e-6)    # inf where a row sees no key
    if causal and seqlen_q > seqlen_k:
        blind = seqlen_q - seqlen_k
        assert torch.equal(out[:, :blind], torch.zeros_like(out[:, :blind]))
        assert torch.isinf(lse[:, :, :blind]).all()


def _backward_pair(q, k, v, grad_out, causal, window, tiles, dropout_p=0.0):
    geometry = call_geometry(q, k, None, 0)
    args = dict(geometry=geometry, softmax_scale=1 / math.sqrt(q.shape[-1]), causal=causal,
                dropout_p=dropout_p, seed=3, offset=512, window=window)
    out, lse = _forward.forward(q, k, v, None, tiles=PORTABLE, **args)
    return _backward.backward(grad_out, q, k, v, out, lse, None, tiles=(tiles, tiles), **args)


@float32_interpreted
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-c{int(c[6])}-w{c[7]}")
def test_hopper_backward_matches_reference_and_portable(case, device):
    batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, causal, window = case
    q, k, v = random_qkv((batch, seqlen_q, heads_q, head_dim), (batch, seqlen_k, heads_k, head_dim),
                         torch.float32, device)
    grad_out = torch.randn_like(q)
    geometry = call_geometry(q, k, None, 0)
    lse = _forward.new_outputs(q, geometry)[1]
    (dq_chosen, *_), (dkdv_chosen, *_) = _backward.launch_configs(
        grad_out, q, k, v, q, lse, q, k, v, geometry, 0.1, causal, 0.0, (HOPPER, HOPPER), window)
    assert dq_chosen is _backward.DQ_HOPPER
    # GQA keeps the portable dK/dV kernel: the Hopper one holds one query head per kv-head.
    assert dkdv_chosen is (_backward.DKDV_HOPPER if heads_q == heads_k else _backward.DKDV)
    grads = _backward_pair(q, k, v, grad_out, causal, window, HOPPER)
    portable = _backward_pair(q, k, v, grad_out, causal, window, PORTABLE)
    exact = attention_reference(q.double(), k.double(), v.double(), causal=causal,
                                window=None if window == (-1, -1) else window)
    exact_grads = torch.autograd.grad(exact, (q, k, v), grad_out.double())
    for grad, portable_grad, exact_grad in zip(grads, portable, exact_grads):
        assert torch.allclose(grad, portable_grad, rtol=0, atol=1e-5)
        assert (grad.double() - exact_grad).abs().max().item() < 1e-4


@float32_interpreted
def test_hopper_dq_with_dropout_equals_portable(device):
    # With dropout only dQ runs on the Hopper kernel (dK/dV stays portable); the same mask.
    q, k, v = random_qkv((1, 70, 2, 32), (1, 70, 2, 32), torch.float32, device)
    grad_out = torch.randn_like(q)
    geometry = call_geometry(q, k, None, 0)
    lse = _forward.new_outputs(q, geometry)[1]
    (dq_chosen, *_), (dkdv_chosen, *_) = _backward.launch_configs(
        grad_out, q, k, v, q, lse, q, k, v, geometry, 0.1, True, 0.3, (HOPPER, HOPPER))
    assert dq_chosen is _backward.DQ_HOPPER and dkdv_chosen is _backward.DKDV
    grads = _backward_pair(q, k, v, grad_out, True, (-1, -1), HOPPER, dropout_p=0.3)
    portable = _backward_pair(q, k, v, grad_out, True, (-1, -1), PORTABLE, dropout_p=0.3)
    for grad, portable_grad in zip(grads, portable):
        assert torch.allclose(grad, portable_grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_hopper_kernels_matches_reference(dtype, causal, device, monkeypatch):
    # The whole op with the forward and both backward passes on the Hopper kernels, against float64, as
    # flash_attention runs when the tuned tiles ask for them.
    from kernels import _eager_plan
    on_cpu = device == "cpu"
    forward_tiles = HOPPER if on_cpu else Tiles(128, 64, 4, 2, warp_specialize=True)
    kv_tiles = HOPPER if on_cpu else Tiles(64, 128, 4, 2, warp_specialize=True)
    q_tiles = HOPPER if on_cpu else Tiles(128, 64, 4, 2, warp_specialize=True)
    monkeypatch.setattr(_forward, "forward_tiles", lambda *args: forward_tiles)
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args: kv_tiles)
    monkeypatch.setattr(_backward, "dq_tiles", lambda *args: q_tiles)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})     # no plan bound to another kernel
    q, k, v = random_qkv((2, 45, 4, 64), (2, 45, 2, 64), dtype, device)
    check_against_reference(q, k, v, causal=causal)
    if on_cpu:   # the ragged query end and GQA (portable dK/dV) as well
        q, k, v = random_qkv((1, 45, 2, 32), (1, 45, 2, 32), dtype, device)
        check_against_reference(q, k, v, causal=causal)


@float32_interpreted
def test_unsupported_calls_take_the_portable_kernel(device):
    q, k, v = random_qkv((1, 32, 2, 32), (1, 32, 2, 32), torch.float32, device, requires_grad=False)
    assert _chosen_kernel(q, k, v) is _forward.FORWARD_HOPPER
    assert _chosen_kernel(q, k, v, dropout_p=0.1) is _forward.FORWARD_HOPPER
    # With dropout a query tile split between two consumer warpgroups does not specialize.
    wide = Tiles(128, 64, 4, 2, warp_specialize=True)
    assert _chosen_kernel(q, k, v, tiles=wide) is _forward.FORWARD_HOPPER
    assert _chosen_kernel(q, k, v, dropout_p=0.1, tiles=wide) is _forward.FORWARD
    # Rows of 3 float32 heads of 5 values: 60-byte strides, which TMA cannot address.
    odd = torch.randn(1, 32, 3, 5, device=device)[:, :, :2]
    assert not _hopper.supported((odd, odd, odd), varlen=False)
    packed = torch.randn(64, 2, 32, device=device)
    assert not _hopper.supported((packed, packed, packed), varlen=True)
    assert _hopper.supported((q, k, v), varlen=False)


def test_hopper_forward_needs_the_interpreter_or_sm90():
    # On a CUDA device below sm_90, or on the CPU without the interpreter, the portable kernel runs.
    from kernels._launch import INTERPRETED
    q = torch.randn(1, 32, 2, 32)
    assert _hopper.supported((q, q, q), varlen=False) == INTERPRETED


def test_masked_flag():
    # A band, or a ragged last block of the streamed axis (keys: forward, dQ; queries: dK/dV).
    assert not _hopper.masked(False, (-1, -1), 4096, 128)
    assert _hopper.masked(False, (-1, -1), 4000, 128)
    assert _hopper.masked(True, (-1, -1), 4096, 128)
    assert _hopper.masked(False, (256, -1), 4096, 128)
    assert _hopper.masked(False, (-1, 0), 4096, 128)


@float32_interpreted
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_forward_with_dropout_equals_portable(causal, device):
    # The same Philox mask as the portable kernels, so the backward (portable) differentiates it.
    q, k, v = random_qkv((1, 70, 2, 32), (1, 70, 2, 32), torch.float32, device, requires_grad=False)
    geometry = call_geometry(q, k, None, 0)
    args = dict(geometry=geometry, softmax_scale=0.2, causal=causal, dropout_p=0.3, seed=9,
                offset=4096)
    out, lse = _forward.forward(q, k, v, None, tiles=HOPPER, **args)
    portable_out, portable_lse = _forward.forward(q, k, v, None, tiles=PORTABLE, **args)
    assert torch.allclose(out, portable_out, rtol=0, atol=1e-6)
    assert torch.equal(lse, portable_lse)
    other_seed = _forward.forward(q, k, v, None, tiles=HOPPER, **(args | {"seed": 10}))[0]
    assert not torch.allclose(out, other_seed)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_hopper_forward_and_dropout_matches_reference(causal, device, monkeypatch):
    from kernels import _eager_plan
    from kernels import flash_attention
    # dropout: the forward and dQ on the Hopper kernels (64-row tiles), dK/dV portable
    tiles = HOPPER if device == "cpu" else Tiles(64, 64, 4, 2, warp_specialize=True)
    monkeypatch.setattr(_forward, "forward_tiles", lambda *args: tiles)
    monkeypatch.setattr(_backward, "dq_tiles", lambda *args: tiles)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    q, k, v = random_qkv((1, 45, 2, 32), (1, 45, 2, 32), torch.bfloat16, device)
    torch.manual_seed(21)
    _, keep = flash_attention(q, k, v, causal=causal, dropout_p=0.2, return_debug_mask=True)
    torch.manual_seed(21)
    check_against_reference(q, k, v, causal=causal, dropout_p=0.2, dropout_mask=keep)


@float32_interpreted
def test_a_hopper_kernel_that_does_not_compile_falls_back_once(device, monkeypatch):
    # Triton 3.6's warp-specialization pass fails on some tile shapes (a RuntimeError from its pass
    # manager): the call runs the portable kernel, with one warning, and never retries that key.
    monkeypatch.setattr(_hopper, "FALLBACKS", set())
    attempts = []

    def refuse(grid, args, options):
        attempts.append(options)
        raise RuntimeError("PassManager::run failed")
    monkeypatch.setattr(_forward.FORWARD_HOPPER, "launch", refuse)
    q, k, v = random_qkv((1, 40, 2, 32), (1, 40, 2, 32), torch.float32, device, requires_grad=False)
    with pytest.warns(RuntimeWarning, match="did not compile"):
        out, _ = _forward_pair(q, k, v, True, (-1, -1), HOPPER)
    again, _ = _forward_pair(q, k, v, True, (-1, -1), HOPPER)
    assert len(attempts) == 1 and len(_hopper.FALLBACKS) == 1
    portable, _ = _forward_pair(q, k, v, True, (-1, -1), PORTABLE)
    assert torch.equal(out, portable) and torch.equal(again, portable)


@float32_interpreted
def test_other_errors_of_a_hopper_launch_are_not_swallowed(device, monkeypatch):
    monkeypatch.setattr(_hopper, "FALLBACKS", set())

    def fail(grid, args, options):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(_forward.FORWARD_HOPPER, "launch", fail)
    q, k, v = random_qkv((1, 40, 2, 32), (1, 40, 2, 32), torch.float32, device, requires_grad=False)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _forward_pair(q, k, v, False, (-1, -1), HOPPER)
    assert not _hopper.FALLBACKS
