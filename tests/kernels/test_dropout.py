"""Dropout: the mask is regenerated from (seed, offset), never stored; checked through the debug mask."""

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from kernels import flash_attention
from kernels._philox import effective_dropout_p

from .numerics import check_against_reference, random_qkv


def _seeded_call(seed, q, k, v, **kwargs):
    torch.manual_seed(seed)
    return flash_attention(q, k, v, return_debug_mask=True, **kwargs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 33, 33, 2, 2, 32), (1, 40, 70, 4, 2, 64), (1, 70, 40, 2, 1, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_output_and_grads_match_reference_under_the_mask(shape, causal, device):
    batch, seqlen_q, seqlen_k, heads_q, heads_k, head_dim = shape
    q, k, v = random_qkv((batch, seqlen_q, heads_q, head_dim), (batch, seqlen_k, heads_k, head_dim),
                         torch.float32, device)
    torch.manual_seed(11)
    _, keep = flash_attention(q, k, v, causal=causal, dropout_p=0.25, return_debug_mask=True)
    assert keep.shape == (batch, heads_q, seqlen_q, seqlen_k) and keep.dtype == torch.bool
    torch.manual_seed(11)   # the same draw again, now inside the checked call
    check_against_reference(q, k, v, causal=causal, dropout_p=0.25, dropout_mask=keep)


def test_varlen_dropout_matches_reference(device):
    cu_seqlens = torch.tensor([0, 7, 30, 31], dtype=torch.int32, device=device)
    q, k, v = random_qkv((31, 2, 32), (31, 2, 32), torch.float32, device)
    torch.manual_seed(5)
    _, keep = flash_attention(q, k, v, causal=True, dropout_p=0.4, cu_seqlens=cu_seqlens,
                              max_seqlen=23, return_debug_mask=True)
    assert keep.shape == (3, 2, 23, 23)
    torch.manual_seed(5)
    check_against_reference(q, k, v, causal=True, dropout_p=0.4, cu_seqlens=cu_seqlens,
                            max_seqlen=23, dropout_mask=keep)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])   # 0.1 is realized as 26/256
def test_kept_fraction_is_one_minus_p(dropout_p, device):
    q, k, v = random_qkv((2, 128, 4, 16), (2, 128, 4, 16), torch.float32, device, requires_grad=False)
    _, keep = _seeded_call(3, q, k, v, dropout_p=dropout_p)
    dropout_p = effective_dropout_p(dropout_p)     # rounded to a multiple of 1/256
    n = keep.numel()
    sigma = math.sqrt(dropout_p * (1 - dropout_p) / n)
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 5 * sigma
    # No structure: every head, row block and byte position of a Philox word keeps ~1-p. Element
    # (i, j) takes byte 2 * ((i // 8) % 2) + j % 2 of word (j % 32) // 8 (see kernels/_philox.py).
    rows, cols = torch.arange(keep.shape[2], device=device), torch.arange(keep.shape[3], device=device)
    phases = [keep[:, :, (rows // 8) % 2 == s][..., ((cols % 32) // 8 == w) & (cols % 2 == c)]
              for s in range(2) for w in range(4) for c in range(2)]
    for part in (keep[:, 0], keep[:, 3], keep[:, :, :16], *phases):
        part_sigma = math.sqrt(dropout_p * (1 - dropout_p) / part.numel())
        assert abs(part.float().mean().item() - (1 - dropout_p)) < 5 * part_sigma
    assert not torch.equal(keep[:, 0], keep[:, 1])


def test_same_seed_is_bit_identical_new_seed_is_not(device):
    q, k, v = random_qkv((1, 40, 2, 32), (1, 40, 2, 32), torch.float32, device)
    grad_out = torch.randn(1, 40, 2, 32, device=device)

    def run(seed):
        out, keep = _seeded_call(seed, q, k, v, dropout_p=0.3, causal=True)
        return out, keep, torch.autograd.grad(out, (q, k, v), grad_out)

    out_a, keep_a, grads_a = run(1)
    out_b, keep_b, grads_b = run(1)
    out_c, keep_c, _ = run(2)
    assert torch.equal(out_a, out_b) and torch.equal(keep_a, keep_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert not torch.equal(keep_a, keep_c) and not torch.equal(out_a, out_c)


def test_consecutive_calls_draw_fresh_masks(device):
    q, k, v = random_qkv((1, 32, 2, 16), (1, 32, 2, 16), torch.float32, device, requires_grad=False)
    torch.manual_seed(0)
    _, first = flash_attention(q, k, v, dropout_p=0.5, return_debug_mask=True)
    _, second = flash_attention(q, k, v, dropout_p=0.5, return_debug_mask=True)
    assert not torch.equal(first, second)


def test_debug_mask_does_not_change_the_output(device):
    q, k, v = random_qkv((1, 25, 2, 32), (1, 25, 2, 32), torch.float32, device, requires_grad=False)
    out_with, _ = _seeded_call(9, q, k, v, dropout_p=0.2)
    torch.manual_seed(9)
    out_without = flash_attention(q, k, v, dropout_p=0.2)
    assert torch.equal(out_with, out_without)


def test_debug_mask_without_dropout_keeps_everything(device):
    q, k, v = random_qkv((1, 9, 1, 16), (1, 9, 1, 16), torch.float32, device, requires_grad=False)
    _, keep = flash_attention(q, k, v, return_debug_mask=True)
    assert keep.all() and keep.shape == (1, 1, 9, 9)


def test_activation_checkpointing_replays_the_mask(device):
    q, k, v = random_qkv((1, 36, 2, 32), (1, 36, 2, 32), torch.float32, device)
    weight = torch.randn(32, 32, device=device)
    grad_out = torch.randn(1, 36, 2, 32, device=device)

    def layer(q, k, v):
        return flash_attention(q @ weight, k, v, dropout_p=0.3, causal=True) @ weight

    torch.manual_seed(4)
    plain = torch.autograd.grad(layer(q, k, v), (q, k, v), grad_out)
    torch.manual_seed(4)
    recomputed = torch.autograd.grad(checkpoint(layer, q, k, v, use_reentrant=False), (q, k, v),
                                     grad_out)
    for a, b in zip(plain, recomputed):
        assert torch.equal(a, b)


def test_dkdv_mask_layouts_give_the_same_gradients(device, monkeypatch):
    """The dK/dV pass can apply the mask two ways (kernels/_backward_kernels.py); both are one mask."""
    from kernels import _backward
    q, k, v = random_qkv((1, 50, 2, 32), (1, 50, 2, 32), torch.float32, device)
    grad_out = torch.randn(1, 50, 2, 32, device=device)

    def grads():
        torch.manual_seed(8)
        out = flash_attention(q, k, v, causal=True, dropout_p=0.3)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    chosen = grads()
    monkeypatch.setattr(_backward, "DKDV_MASK_LAYOUT", "broadcast")
    for mine, theirs in zip(grads(), chosen):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)


def test_tiles_the_untransposed_layout_miscompiles_take_the_broadcast_one():
    # On a GPU the untransposed layout's dK is wrong at 16 x 128 tiles (attention_notes.md, v13);
    # the interpreter, which runs it exactly, keeps the chosen layout for every tiling.
    from kernels._backward import DKDV_MASK_LAYOUT, dkdv_mask_layout
    from kernels._launch import Tiles
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert DKDV_MASK_LAYOUT == "untransposed"
    assert dkdv_mask_layout(Tiles(16, 128, 4, 3), gpu) == "broadcast"
    assert dkdv_mask_layout(Tiles(16, 128, 4, 3, fused=True), gpu) == "broadcast"
    for measured_exact in (Tiles(16, 64, 4, 3), Tiles(32, 128, 4, 3), Tiles(64, 64, 4, 3),
                           Tiles(128, 64, 8, 2)):
        assert dkdv_mask_layout(measured_exact, gpu) == "untransposed"
    assert dkdv_mask_layout(Tiles(16, 128, 4, 3), cpu) == "untransposed"
