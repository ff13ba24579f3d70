"""Sliding-window (local) attention, window=(left, right): against the float64 reference with
causal masking, Nq != Nk (bottom-right alignment), GQA, variable length and dropout."""

import pytest
import torch

from kernels import attention_reference, flash_attention

from .numerics import check_against_reference, random_qkv

# (batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim), causal, window. The interpreter's tiles
# are 16 queries x 32 keys, so these windows leave whole tiles out, cut tiles at both edges and,
# when wide, leave fully visible tiles in between.
CASES = [
    ((1, 100, 100, 2, 1, 32), True, (20, 0)),
    ((1, 100, 100, 2, 1, 32), True, (60, None)),
    ((2, 70, 70, 2, 2, 24), False, (10, 5)),
    ((1, 90, 90, 1, 1, 16), False, (None, 3)),
    ((1, 90, 90, 1, 1, 16), False, (7, None)),
    ((1, 64, 64, 1, 1, 32), False, (0, 0)),
    ((1, 40, 97, 4, 2, 32), True, (30, None)),       # Nq < Nk: a query block at the end of a cache
    ((1, 97, 40, 2, 1, 32), False, (6, 9)),          # Nq > Nk: some queries see no key
    ((1, 97, 40, 2, 1, 48), True, (12, 0)),
]


@pytest.mark.parametrize("shape, causal, window", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_window_matches_reference(shape, causal, window, device):
    batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim = shape
    q, k, v = random_qkv((batch, seqlen_q, heads_q, head_dim), (batch, seqlen_k, heads_k, head_dim),
                         torch.float32, device)
    check_against_reference(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_window_matches_reference_half(dtype, device):
    q, k, v = random_qkv((1, 80, 4, 64), (1, 80, 2, 64), dtype, device)
    check_against_reference(q, k, v, causal=True, window=(25, 0))


@pytest.mark.parametrize("causal, window", [(True, (9, 0)), (False, (4, 11))])
def test_window_with_variable_length(causal, window, device):
    cu_seqlens = torch.tensor([0, 5, 58, 59, 100], dtype=torch.int32, device=device)
    q, k, v = random_qkv((100, 4, 32), (100, 2, 32), torch.float32, device)
    check_against_reference(q, k, v, causal=causal, window=window, cu_seqlens=cu_seqlens, max_seqlen=53)


@pytest.mark.parametrize("varlen", [False, True])
def test_window_with_dropout(varlen, device):
    extra = {}
    shape_q, shape_kv = (1, 75, 2, 32), (1, 75, 1, 32)
    if varlen:
        extra = dict(cu_seqlens=torch.tensor([0, 30, 75], dtype=torch.int32, device=device), max_seqlen=45)
        shape_q, shape_kv = shape_q[1:], shape_kv[1:]
    q, k, v = random_qkv(shape_q, shape_kv, torch.float32, device)
    torch.manual_seed(7)
    _, keep = flash_attention(q, k, v, causal=True, window=(18, 0), dropout_p=0.3,
                              return_debug_mask=True, **extra)
    torch.manual_seed(7)    # the same draw, regenerated inside the checked call and its backward
    check_against_reference(q, k, v, causal=True, window=(18, 0), dropout_p=0.3, dropout_mask=keep,
                            **extra)


def test_a_window_wider_than_the_sequence_changes_nothing(device):
    q, k, v = random_qkv((1, 70, 2, 32), (1, 70, 2, 32), torch.float32, device, requires_grad=False)
    for causal, window in ((True, (70, 0)), (False, (69, 69)), (True, (None, None))):
        torch.testing.assert_close(flash_attention(q, k, v, causal=causal, window=window),
                                   flash_attention(q, k, v, causal=causal), rtol=1e-6, atol=1e-6)


def test_keys_outside_the_window_have_no_influence(device):
    q, k, v = random_qkv((1, 96, 1, 16), (1, 96, 1, 16), torch.float32, device, requires_grad=False)
    before = flash_attention(q, k, v, causal=True, window=(10, 0))
    k2, v2 = k.clone(), v.clone()
    k2[:, :50], v2[:, :50] = torch.randn_like(k2[:, :50]), torch.randn_like(v2[:, :50])
    after = flash_attention(q, k2, v2, causal=True, window=(10, 0))
    assert torch.equal(before[:, 60:], after[:, 60:])            # query 60 sees keys 50..60
    assert not torch.allclose(before[:, 50:60], after[:, 50:60])


def test_reference_window_mask_is_the_documented_band(device):
    q, k, v = random_qkv((1, 6, 1, 8), (1, 6, 1, 8), torch.float64, device, requires_grad=False)
    v = torch.eye(6, dtype=torch.float64, device=device)[None, :, None, :].expand(1, 6, 1, 6)
    q6 = torch.zeros(1, 6, 1, 6, dtype=torch.float64, device=device)     # uniform attention
    out = attention_reference(q6, q6, v, window=(1, 2))[0, :, 0]          # row i: 1/|band| on its keys
    expected = torch.tensor([[1 if -1 <= j - i <= 2 else 0 for j in range(6)] for i in range(6)],
                            dtype=torch.float64, device=device)
    torch.testing.assert_close(out, expected / expected.sum(1, keepdim=True))


@pytest.mark.parametrize("window, causal, words", [
    ((5, 2), True, "right must be 0 or None"),
    ((-1, 0), False, "window left must be an int >= 0"),
    ((3.0, 0), False, "window left must be an int >= 0"),
    ((4,), False, "pair (left, right)"),
    (8, False, "pair (left, right)"),
])
def test_bad_window_is_named(window, causal, words, device):
    q, k, v = random_qkv((1, 8, 1, 16), (1, 8, 1, 16), torch.float32, device, requires_grad=False)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        flash_attention(q, k, v, causal=causal, window=window)


def test_window_compiles_and_matches_eager(device):
    torch._dynamo.reset()
    layer = lambda q, k, v: flash_attention(q, k, v, causal=True, window=(12, 0)).sum()
    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    q, k, v = random_qkv((1, 48, 2, 16), (1, 48, 1, 16), torch.float32, device)
    for eager, traced in zip(torch.autograd.grad(layer(q, k, v), (q, k, v)),
                             torch.autograd.grad(compiled(q, k, v), (q, k, v))):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
