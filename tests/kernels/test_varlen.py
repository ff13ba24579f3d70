"""Packed variable-length sequences: no attention across boundaries."""

import pytest
import torch

from kernels import flash_attention

from .numerics import check_against_reference, random_qkv


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_reference(causal, device):
    lengths = [5, 17, 1, 37]
    cu_seqlens = torch.tensor([0, 5, 22, 23, 60], dtype=torch.int32, device=device)
    q, k, v = random_qkv((60, 4, 48), (60, 2, 48), torch.float32, device)
    check_against_reference(q, k, v, causal=causal, cu_seqlens=cu_seqlens, max_seqlen=max(lengths))


def test_varlen_equals_separate_calls(device):
    cu_seqlens = torch.tensor([0, 13, 40], dtype=torch.int32, device=device)
    q, k, v = random_qkv((40, 2, 32), (40, 2, 32), torch.float32, device, requires_grad=False)
    packed = flash_attention(q, k, v, causal=True, cu_seqlens=cu_seqlens, max_seqlen=27)
    for start, end in ((0, 13), (13, 40)):
        alone = flash_attention(q[None, start:end], k[None, start:end], v[None, start:end],
                                causal=True)[0]
        torch.testing.assert_close(packed[start:end], alone, rtol=1e-6, atol=1e-6)


def test_no_attention_across_boundaries(device):
    cu_seqlens = torch.tensor([0, 10, 25], dtype=torch.int32, device=device)
    q, k, v = random_qkv((25, 1, 16), (25, 1, 16), torch.float32, device, requires_grad=False)
    before = flash_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=15)
    k2, v2 = k.clone(), v.clone()
    k2[10:] = torch.randn_like(k2[10:])
    v2[10:] = torch.randn_like(v2[10:])
    after = flash_attention(q, k2, v2, cu_seqlens=cu_seqlens, max_seqlen=15)
    assert torch.equal(before[:10], after[:10])
    assert not torch.allclose(before[10:], after[10:])
