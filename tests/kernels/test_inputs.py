"""Input handling: strided views, bad arguments, and the CPU-without-interpreter error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import flash_attention

from .numerics import random_qkv


def test_fused_qkv_views_are_read_in_place(device):
    qkv = torch.randn(2, 30, 3, 4, 32, device=device)        # (B, N, 3, H, D) from a fused projection
    q, k, v = qkv.unbind(dim=2)
    assert not q.is_contiguous()
    out = flash_attention(q, k, v, causal=True)
    expected = flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(out, expected)


def test_non_unit_last_stride_is_accepted(device):
    q, k, v = random_qkv((1, 20, 2, 16), (1, 20, 2, 16), torch.float32, device, requires_grad=False)
    q_t = q.transpose(-1, -2).contiguous().transpose(-1, -2)   # same values, stride(-1) != 1
    assert q_t.stride(-1) != 1
    assert torch.equal(flash_attention(q_t, k, v), flash_attention(q, k, v))


def _qkv(device, dtype=torch.float32, q_shape=(1, 8, 2, 16), kv_shape=(1, 8, 2, 16)):
    return (torch.randn(q_shape, device=device).to(dtype), torch.randn(kv_shape, device=device).to(dtype),
            torch.randn(kv_shape, device=device).to(dtype))


BAD_CALLS = [
    (TypeError, "dtype", lambda d: flash_attention(*_qkv(d, torch.float64))),
    (TypeError, "share one dtype", lambda d: flash_attention(_qkv(d)[0].half(), *_qkv(d)[1:])),
    (ValueError, "4-D", lambda d: flash_attention(*(t[0] for t in _qkv(d)))),
    (ValueError, "multiple", lambda d: flash_attention(*_qkv(d, kv_shape=(1, 8, 3, 16)))),
    (ValueError, "head_dim", lambda d: flash_attention(*_qkv(d, kv_shape=(1, 8, 2, 32)))),
    (ValueError, "head_dim", lambda d: flash_attention(*_qkv(d, q_shape=(1, 8, 2, 320),
                                                             kv_shape=(1, 8, 2, 320)))),
    (ValueError, "batch size", lambda d: flash_attention(*_qkv(d, kv_shape=(2, 8, 2, 16)))),
    (ValueError, "dropout_p", lambda d: flash_attention(*_qkv(d), dropout_p=1.0)),
    (ValueError, "dropout_p", lambda d: flash_attention(*_qkv(d), dropout_p=-0.1)),
    (ValueError, "softmax_scale", lambda d: flash_attention(*_qkv(d), softmax_scale=0.0)),
    (ValueError, "max_seqlen", lambda d: flash_attention(*_qkv(d), max_seqlen=8)),
    (ValueError, ">= 1", lambda d: flash_attention(*_qkv(d, q_shape=(1, 0, 2, 16)))),
]

VARLEN = lambda d: [t.reshape(8, 2, 16) for t in _qkv(d)]
BAD_VARLEN_CALLS = [
    (TypeError, "cu_seqlens", lambda d: flash_attention(
        *VARLEN(d), cu_seqlens=torch.tensor([0, 8], device=d), max_seqlen=8)),
    (ValueError, "max_seqlen", lambda d: flash_attention(
        *VARLEN(d), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32, device=d))),
    (ValueError, "3-D", lambda d: flash_attention(
        *_qkv(d), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32, device=d), max_seqlen=8)),
]


@pytest.mark.parametrize("error, words, call", BAD_CALLS + BAD_VARLEN_CALLS)
def test_bad_input_is_named(error, words, call, device):
    with pytest.raises(error, match=words):
        call(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks host-side offsets, which CPU tensors have")
@pytest.mark.parametrize("cu_seqlens, max_seqlen, words", [
    ([0, 3, 7], 4, "rise from 0 to total_tokens"),
    ([0, 6, 8], 4, "shorter than the longest"),
])
def test_bad_offsets_are_named(cu_seqlens, max_seqlen, words):
    with pytest.raises(ValueError, match=words):
        flash_attention(*VARLEN("cpu"), cu_seqlens=torch.tensor(cu_seqlens, dtype=torch.int32),
                        max_seqlen=max_seqlen)


def test_cpu_without_interpreter_says_what_to_do():
    code = ("import torch; from kernels import flash_attention; "
            "x = torch.randn(1, 4, 1, 16); flash_attention(x, x, x)")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert result.returncode != 0
    assert "TRITON_INTERPRET=1" in result.stderr and "RuntimeError" in result.stderr
