"""Forward and all three gradients against the float64 reference, across shapes and masks."""

import pytest
import torch

from .numerics import check_against_reference, random_qkv

# (batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim): odd lengths, Nq != Nk both ways, GQA/MQA,
# head dims from 8 to 256 including non-powers of two.
SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 17, 17, 2, 2, 32),
    (1, 129, 129, 2, 1, 64),
    (1, 33, 70, 4, 2, 80),
    (1, 70, 33, 2, 2, 96),
    (1, 40, 40, 4, 1, 128),
    (1, 17, 23, 1, 1, 256),
    (2, 20, 20, 3, 3, 24),
    (1, 9, 9, 1, 1, 8),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_float32(shape, causal, device):
    batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim = shape
    q, k, v = random_qkv((batch, seqlen_q, heads_q, head_dim), (batch, seqlen_k, heads_k, head_dim),
                         torch.float32, device)
    check_against_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_half(dtype, causal, device):
    q, k, v = random_qkv((2, 45, 4, 64), (2, 45, 2, 64), dtype, device)
    check_against_reference(q, k, v, causal=causal)


def test_custom_softmax_scale(device):
    q, k, v = random_qkv((1, 30, 2, 32), (1, 30, 2, 32), torch.float32, device)
    check_against_reference(q, k, v, softmax_scale=0.3, causal=True)


def test_queries_that_see_no_key_output_zero(device):
    # Causal with Nq > Nk, aligned bottom-right: the first Nq - Nk queries see nothing.
    from kernels import flash_attention
    q, k, v = random_qkv((1, 20, 1, 16), (1, 5, 1, 16), torch.float32, device)
    out = flash_attention(q, k, v, causal=True)
    assert torch.equal(out[:, :15], torch.zeros_like(out[:, :15]))
    assert (out[:, 15:].abs() > 0).any()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :15], torch.zeros_like(q.grad[:, :15]))


def test_backward_is_deterministic(device):
    from kernels import flash_attention
    q, k, v = random_qkv((1, 50, 4, 32), (1, 50, 2, 32), torch.float32, device)
    grad_out = torch.randn(1, 50, 4, 32, device=device)
    grads = [torch.autograd.grad(flash_attention(q, k, v, causal=True), (q, k, v), grad_out)
             for _ in range(2)]
    for first, second in zip(*grads):
        assert torch.equal(first, second)
