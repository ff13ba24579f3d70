"""GPU-only checks of P from shared memory in the Gluon forwards (``Tiles(..., p_shared=True)``;
compiled schedule: test_p_shared.py): the launch asks for it, and the output (and with dropout
the gradients, through the portable backward) match float64, with no fallback."""

import pytest
import torch

from .numerics import random_qkv
from .test_gpu import sm90_exactly
from .test_gpu_gluon import check_default_forward, gluon_kernel_matches_reference_with_dropout

pytestmark = pytest.mark.gpu


@sm90_exactly
@pytest.mark.parametrize("head_dim, tiles", [(128, (64, 64, 4, 3)), (64, (128, 64, 8, 3))])
@pytest.mark.parametrize("seqlen", [1024, 1088])
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_forward_with_p_shared_on_gpu(head_dim, tiles, seqlen, causal, monkeypatch):
    # 1088 = 17 x 64: a partial last query block; causal: the diagonal blocks' loop too.
    from kernels import _eager_plan, _forward
    from kernels._launch import Tiles
    gluon = Tiles(*tiles, gluon=True, p_shared=True)
    monkeypatch.setattr(_forward, "default_tiles", lambda *args: gluon)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    q, k, v = random_qkv((2, seqlen, 4, head_dim), (2, seqlen, 4, head_dim), torch.bfloat16, "cuda")
    assert _launch_options(q, k, v, causal).get("P_SHARED")
    check_default_forward(q, k, v, causal, _forward.FORWARD_GLUON)


@sm90_exactly
@pytest.mark.parametrize("head_dim, tiles", [(128, (64, 64, 4, 3)), (128, (128, 128, 8, 2)),
                                             (64, (128, 64, 8, 4))])
@pytest.mark.parametrize("causal", [False, True])
def test_gluon_forward_with_p_shared_and_dropout_on_gpu(head_dim, tiles, causal, monkeypatch):
    from kernels import _eager_plan, _forward
    from kernels._launch import Tiles
    gluon = Tiles(*tiles, gluon=True, p_shared=True)
    monkeypatch.setattr(_forward, "default_tiles", lambda *args: gluon)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    gluon_kernel_matches_reference_with_dropout(head_dim, causal, _forward.FORWARD_GLUON)


@sm90_exactly
@pytest.mark.parametrize("head_dim, tiles, head_major", [(128, (192, 64, 4, 2), True),
                                                         (128, (128, 64, 4, 3), False),
                                                         (64, (128, 128, 4, 3), True)])
@pytest.mark.parametrize("seqlen, heads_k, packed", [(1024, 4, False), (4096, 2, False),
                                                     (640, 1, True)])
@pytest.mark.parametrize("causal", [False, True])
def test_pingpong_forward_with_p_shared_on_gpu(head_dim, tiles, head_major, seqlen, heads_k,
                                               packed, causal, monkeypatch):
    # Each consumer's two P slots across tiles (4096: programs walk several), GQA, a partial last
    # tile of 192 rows at 640 tokens with q, k and v slices of one packed tensor.
    from kernels import _eager_plan, _forward
    from kernels._launch import Tiles
    from kernels.qkv_packed import split_qkv
    pingpong = Tiles(*tiles, gluon=True, pingpong=True, head_major=head_major, p_shared=True)
    monkeypatch.setattr(_forward, "default_tiles", lambda *args: pingpong)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})
    if packed:
        qkv = torch.randn(2, seqlen, 4 + 2 * heads_k, head_dim, device="cuda").to(torch.bfloat16)
        q, k, v = (t.detach().requires_grad_() for t in split_qkv(qkv, heads_k))
    else:
        q, k, v = random_qkv((2, seqlen, 4, head_dim), (2, seqlen, heads_k, head_dim),
                             torch.bfloat16, "cuda")
    assert _launch_options(q, k, v, causal).get("P_SHARED")
    check_default_forward(q, k, v, causal, _forward.FORWARD_PINGPONG)


def _launch_options(q, k, v, causal):
    from kernels import _forward
    from kernels._launch import call_geometry
    geometry = call_geometry(q, k, None, 0)
    out, lse = _forward.new_outputs(q, geometry)
    return _forward.launch_config(q, k, v, out, lse, geometry, 0.1, causal, 0.0)[3]
