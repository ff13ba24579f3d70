"""The TMA forward (_forward_tma.py): exact against the float64 reference and equal to the portable
kernel, and chosen only for the calls it supports; by default only where it was measured faster."""

import math

import pytest
import torch

from kernels import _forward, _hopper, attention_reference
from kernels._launch import Tiles, call_geometry

from .numerics import check_against_reference, random_qkv

pytestmark = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0),
                                reason="the TMA forward needs sm_90 or later")

# Interpreter-sized tiles; the flag is what selects the kernel.
TMA = Tiles(32, 32, 1, 1, tma=True)
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


def _chosen_kernel(q, k, v, causal=False, window=(-1, -1), dropout_p=0.0, tiles=TMA):
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
def test_tma_forward_matches_reference_and_portable(case, device):
    batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim, causal, window = case
    q, k, v = random_qkv((batch, seqlen_q, heads_q, head_dim), (batch, seqlen_k, heads_k, head_dim),
                         torch.float32, device, requires_grad=False)
    assert _chosen_kernel(q, k, v, causal, window) is _forward.FORWARD_TMA
    out, lse = _forward_pair(q, k, v, causal, window, TMA)
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_tma_forward_matches_reference(dtype, causal, device, monkeypatch):
    # The whole op with its forward on the TMA kernel (the backward is portable), against float64.
    from kernels import _eager_plan
    tiles = TMA if device == "cpu" else Tiles(128, 64, 4, 2, tma=True)
    monkeypatch.setattr(_forward, "default_tiles", lambda *args: tiles)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})     # no plan bound to another kernel
    q, k, v = random_qkv((2, 45, 4, 64), (2, 45, 2, 64), dtype, device)
    check_against_reference(q, k, v, causal=causal)


@float32_interpreted
def test_unsupported_calls_take_the_portable_kernel(device):
    q, k, v = random_qkv((1, 32, 2, 32), (1, 32, 2, 32), torch.float32, device, requires_grad=False)
    assert _chosen_kernel(q, k, v) is _forward.FORWARD_TMA
    assert _chosen_kernel(q, k, v, dropout_p=0.1, causal=True) is _forward.FORWARD_TMA
    assert _chosen_kernel(q, k, v, tiles=Tiles(32, 32, 1, 1)) is _forward.FORWARD
    # Rows of 3 float32 heads of 5 values: 60-byte strides, which TMA cannot address.
    odd = torch.randn(1, 32, 3, 5, device=device)[:, :, :2]
    assert not _hopper.supported((odd, odd, odd), varlen=False)
    packed = torch.randn(64, 2, 32, device=device)
    assert not _hopper.supported((packed, packed, packed), varlen=True)
    assert _hopper.supported((q, k, v), varlen=False)


def test_tma_forward_needs_the_interpreter_or_sm90():
    # On a CUDA device below sm_90, or on the CPU without the interpreter, the portable kernel runs.
    from kernels._launch import INTERPRETED
    q = torch.randn(1, 32, 2, 32)
    assert _hopper.supported((q, q, q), varlen=False) == INTERPRETED


def test_masked_flag():
    # A band, or a ragged last key block.
    assert not _hopper.masked(False, (-1, -1), 4096, 128)
    assert _hopper.masked(False, (-1, -1), 4000, 128)
    assert _hopper.masked(True, (-1, -1), 4096, 128)
    assert _hopper.masked(False, (256, -1), 4096, 128)
    assert _hopper.masked(False, (-1, 0), 4096, 128)


@float32_interpreted
@pytest.mark.parametrize("causal", [False, True])
def test_tma_forward_with_dropout_equals_portable(causal, device):
    # The same Philox mask as the portable kernel, so the (portable) backward differentiates it.
    q, k, v = random_qkv((1, 70, 2, 32), (1, 70, 2, 32), torch.float32, device, requires_grad=False)
    geometry = call_geometry(q, k, None, 0)
    args = dict(geometry=geometry, softmax_scale=0.2, causal=causal, dropout_p=0.3, seed=9,
                offset=4096)
    out, lse = _forward.forward(q, k, v, None, tiles=TMA, **args)
    portable_out, portable_lse = _forward.forward(q, k, v, None, tiles=PORTABLE, **args)
    assert torch.allclose(out, portable_out, rtol=0, atol=1e-6)
    assert torch.equal(lse, portable_lse)
    other_seed = _forward.forward(q, k, v, None, tiles=TMA, **(args | {"seed": 10}))[0]
    assert not torch.allclose(out, other_seed)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_tma_forward_and_dropout_matches_reference(causal, device, monkeypatch):
    from kernels import _eager_plan
    from kernels import flash_attention
    tiles = TMA if device == "cpu" else Tiles(128, 64, 4, 2, tma=True)
    monkeypatch.setattr(_forward, "default_tiles", lambda *args: tiles)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    q, k, v = random_qkv((1, 45, 2, 32), (1, 45, 2, 32), torch.bfloat16, device)
    torch.manual_seed(21)
    _, keep = flash_attention(q, k, v, causal=causal, dropout_p=0.2, return_debug_mask=True)
    torch.manual_seed(21)
    check_against_reference(q, k, v, causal=causal, dropout_p=0.2, dropout_mask=keep)


@float32_interpreted
def test_a_tma_kernel_that_does_not_compile_falls_back_once(device, monkeypatch):
    # A Triton pass that fails raises a RuntimeError from its pass manager: the call runs the
    # portable kernel, with one warning, and never retries that key.
    monkeypatch.setattr(_hopper, "FALLBACKS", set())
    attempts = []

    def refuse(grid, args, options):
        attempts.append(options)
        raise RuntimeError("PassManager::run failed")
    monkeypatch.setattr(_forward.FORWARD_TMA, "launch", refuse)
    q, k, v = random_qkv((1, 40, 2, 32), (1, 40, 2, 32), torch.float32, device, requires_grad=False)
    with pytest.warns(RuntimeWarning, match="did not compile"):
        out, _ = _forward_pair(q, k, v, True, (-1, -1), TMA)
    again, _ = _forward_pair(q, k, v, True, (-1, -1), TMA)
    assert len(attempts) == 1 and len(_hopper.FALLBACKS) == 1
    portable, _ = _forward_pair(q, k, v, True, (-1, -1), PORTABLE)
    assert torch.equal(out, portable) and torch.equal(again, portable)


@float32_interpreted
def test_other_errors_of_a_tma_launch_are_not_swallowed(device, monkeypatch):
    monkeypatch.setattr(_hopper, "FALLBACKS", set())

    def fail(grid, args, options):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(_forward.FORWARD_TMA, "launch", fail)
    q, k, v = random_qkv((1, 40, 2, 32), (1, 40, 2, 32), torch.float32, device, requires_grad=False)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _forward_pair(q, k, v, False, (-1, -1), TMA)
    assert not _hopper.FALLBACKS


@float32_interpreted
def test_default_tiles_take_the_tma_forward_only_where_it_was_faster(device, monkeypatch):
    # Measured ahead of the portable kernel only without a band, dropout or a ragged last key block.
    monkeypatch.setattr(_forward, "tma_forward_tiles", lambda *args: TMA)
    portable = _forward.forward_tiles(32, torch.device(device), torch.float32)

    def chosen(seqlen, causal=False, dropout_p=0.0, window=(-1, -1)):
        q, k, v = random_qkv((1, seqlen, 2, 32), (1, seqlen, 2, 32), torch.float32, device,
                             requires_grad=False)
        geometry = call_geometry(q, k, None, 0)
        return _forward.default_tiles(q, k, v, geometry, causal, dropout_p, window)
    assert chosen(64) == TMA
    assert chosen(64, causal=True) == portable
    assert chosen(64, window=(16, 16)) == portable
    assert chosen(64, dropout_p=0.1) == portable
    assert chosen(70) == portable          # ragged last key block: every tile would be masked
    packed = torch.randn(64, 2, 32, device=device)
    geometry = call_geometry(packed, packed, torch.tensor([0, 30, 64], dtype=torch.int32), 30)
    assert _forward.default_tiles(packed, packed, packed, geometry, False, 0.0, (-1, -1)) == portable


@float32_interpreted
def test_default_tiles_take_the_gluon_forward_where_it_takes_the_call(device, monkeypatch):
    # Gluon tiles come first where the kernel's schedule covers the call; else TMA or portable.
    gluon = Tiles(32, 32, 1, 1, gluon=True)
    monkeypatch.setattr(_forward, "tma_forward_tiles", lambda *args: TMA)
    monkeypatch.setattr(_forward, "gluon_forward_tiles",
                        lambda head_dim, device, dtype, causal, dropout: gluon if causal else None)
    # The interpreter has no Gluon; the device and dtype checks are the kernel's own GPU tests'.
    monkeypatch.setattr(_hopper, "gluon_supported",
                        lambda tensors, varlen, *call: not varlen and _hopper.gluon_call(*call))
    portable = _forward.forward_tiles(64, torch.device(device), torch.float32)

    def chosen(seqlen_q, seqlen_k, causal=True, dropout_p=0.0, window=(-1, -1)):
        q = torch.randn(1, seqlen_q, 2, 64, device=device)
        k = torch.randn(1, seqlen_k, 2, 64, device=device)
        geometry = call_geometry(q, k, None, 0)
        return _forward.default_tiles(q, k, k, geometry, causal, dropout_p, window)
    assert chosen(64, 64) == gluon
    assert chosen(64, 64, causal=False) == TMA
    assert chosen(32, 64) == portable        # causal with fewer queries than keys: not its diagonal
    assert chosen(70, 70) == portable        # ragged last key block
    assert chosen(64, 64, dropout_p=0.1) == gluon           # key blocks of 32: the mask's counter blocks
    assert chosen(64, 64, window=(16, 0)) == portable


def test_gluon_forward_tiles_exist_only_for_measured_settings(monkeypatch):
    from kernels import _launch, _tile_rules
    cuda = torch.device("cuda", 0)
    assert _tile_rules.gluon_forward_tiles(128, torch.device("cpu"), torch.bfloat16, True) is None
    for capability, expected in [((9, 0), True), ((8, 0), False), ((10, 0), False)]:
        monkeypatch.setattr(_launch, "capability", lambda device: capability)
        assert (_tile_rules.gluon_forward_tiles(128, cuda, torch.bfloat16, True) is not None) == expected
    monkeypatch.setattr(_launch, "capability", lambda device: (9, 0))
    assert _tile_rules.gluon_forward_tiles(128, cuda, torch.bfloat16, False) is None   # tied TMA
    assert _tile_rules.gluon_forward_tiles(64, cuda, torch.bfloat16, True) is None     # lost
    assert _tile_rules.gluon_forward_tiles(128, cuda, torch.float32, True) is None
    # With dropout (no TMA forward there) it beat the portable kernel at head dim 128 and at 64
    # without a mask; head dim 64 causal is not measured.
    for causal in (False, True):
        assert _tile_rules.gluon_forward_tiles(128, cuda, torch.bfloat16, causal, dropout=True) is not None
    assert _tile_rules.gluon_forward_tiles(64, cuda, torch.bfloat16, False, dropout=True) is not None
    assert _tile_rules.gluon_forward_tiles(64, cuda, torch.bfloat16, True, dropout=True) is None
    assert _tile_rules.gluon_forward_tiles(256, cuda, torch.bfloat16, False, dropout=True) is None


def test_tma_forward_tiles_exist_only_for_measured_settings():
    from kernels._tile_rules import tma_forward_tiles
    assert tma_forward_tiles(64, torch.device("cpu"), torch.bfloat16) is None
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        sm90 = torch.cuda.get_device_capability() >= (9, 0)
        assert (tma_forward_tiles(128, cuda, torch.bfloat16) is not None) == sm90
        assert tma_forward_tiles(128, cuda, torch.float32) is None
        assert tma_forward_tiles(96, cuda, torch.bfloat16) is None
        assert tma_forward_tiles(64, cuda, torch.bfloat16) is None     # no clear gain measured


def test_every_option_the_portable_kernels_lack_is_left_out_of_a_fallback():
    # Triton refuses a keyword its kernel does not have (on a GPU; the interpreter ignores it):
    # every constexpr a Hopper kernel has beyond its portable kernel's must be one a fallback
    # leaves out. (num_warps is a launch option of the portable kernels; the persistent kernels'
    # extra runtime argument, batches, is dropped by their own fallback launch.)
    import inspect
    from kernels import _backward, _forward

    def parameters(launcher):
        return set(inspect.signature(getattr(launcher.kernel, "fn", launcher.kernel)).parameters)
    pairs = [(_forward.FORWARD_TMA, _forward.FORWARD), (_forward.FORWARD_GLUON, _forward.FORWARD),
             (_forward.FORWARD_PINGPONG, _forward.FORWARD), (_backward.DQ_GLUON, _backward.DQ),
             (_backward.DKDV_GLUON, _backward.DKDV),
             (_backward.DKDV_WARP_SPECIALIZED, _backward.DKDV),
             (_backward.DKDV_WS_PERSISTENT, _backward.DKDV)]
    for hopper, portable in pairs:
        extra = parameters(hopper) - parameters(portable) - {"num_warps", "batches"}
        assert extra <= set(_hopper.HOPPER_ONLY_OPTIONS), (hopper.kernel, extra)
