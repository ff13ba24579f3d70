"""The direct launch path must pick exactly the kernel Triton's own launch path would."""

import itertools

import pytest
import torch
from triton._C.libtriton import native_specialize_impl
from triton.backends.nvidia.compiler import CUDABackend

from kernels import _backward, _forward, flash_attention
from kernels._direct_launch import _specialization

from .numerics import random_qkv

_storage = torch.zeros(64, dtype=torch.bfloat16)
ARGUMENTS = [
    # integers around every boundary Triton specializes on: 1, multiples of 16, 32/64-bit range
    0, 1, 2, 15, 16, 17, 32, 48, 2048, 16384, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16,
    2**40, 2**40 + 7, 2**62 + 3, 2**63 - 16, 2**63, 2**64 - 16,
    0.0, 1.0, 0.125, True, False, None,
    # tensors: dtypes and 16-byte alignment (a bf16 element is 2 bytes)
    _storage, _storage[1:], _storage[8:], torch.zeros(4, dtype=torch.float16),
    torch.zeros(4, dtype=torch.float32), torch.zeros(4, dtype=torch.float32)[1:],
    torch.zeros(4, dtype=torch.int32),
]


def _triton_specialization(arg):
    return native_specialize_impl(CUDABackend, arg, False, True, True)


def test_equal_keys_mean_equal_triton_specializations():
    """The cache key refines Triton's: two arguments it does not tell apart, Triton does not either."""
    conflated = [(left, right) for left, right in itertools.combinations(ARGUMENTS, 2)
                 if _specialization(left) == _specialization(right)
                 and _triton_specialization(left) != _triton_specialization(right)]
    assert not conflated, f"one key, different Triton specializations: {conflated}"


def test_every_argument_maps_to_its_own_triton_specialization():
    # Guards the test above against a key so fine that no two arguments ever share it.
    keys = {_specialization(arg) for arg in ARGUMENTS}
    assert len(keys) < len(ARGUMENTS)


@pytest.mark.gpu
def test_direct_launches_match_tritons_path_bit_for_bit():
    q, k, v = random_qkv((2, 300, 4, 64), (2, 300, 2, 64), torch.bfloat16, "cuda")
    grad_out = torch.randn_like(q)
    launchers = (_forward.FORWARD, _backward.DQ, _backward.DKDV)
    for launcher in launchers:
        launcher.compiled.clear()
    results = []
    for _ in range(2):     # the first call goes through Triton and fills the cache; the second not
        torch.manual_seed(5)
        out = flash_attention(q, k, v, causal=True, dropout_p=0.1)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    assert all(len(launcher.compiled) == 1 for launcher in launchers)
    for first, second in zip(*results):
        assert torch.equal(first, second)
