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


class _FakeLauncher:
    """Stands in for Triton's CudaLauncher: records the C launch function's arguments."""

    def __init__(self, global_scratch_size, profile_scratch_size=0):
        self.global_scratch_size, self.profile_scratch_size = global_scratch_size, profile_scratch_size
        self.num_ctas, self.launch_cooperative_grid, self.launch_pdl = 1, False, False
        self.calls = []

    def launch(self, *args):
        self.calls.append(args)


class _FakeCompiled:
    def __init__(self, launcher):
        self.run, self.function, self.packed_metadata = launcher, 1234, (4, 1, 0)


@pytest.mark.parametrize("scratch_bytes", [0, 384])
def test_bound_kernel_passes_global_scratch_sized_by_the_grid(scratch_bytes, monkeypatch):
    # Kernels that build tensor descriptors on the device (the Hopper forward) need 384 bytes of
    # global scratch per program: the bound kernel allocates it itself, with no Triton allocator.
    from kernels import _direct_launch
    sizes = []
    monkeypatch.setattr(_direct_launch, "_cuda_scratch",
                        lambda size, alignment, stream: sizes.append(size) or torch.empty(size, dtype=torch.uint8))
    launcher = _FakeLauncher(scratch_bytes)
    bound = _direct_launch.BoundKernel(_FakeCompiled(launcher), constexprs=(64,))
    bound((3, 2, 5), 77, "a", "b")
    (call,) = launcher.calls
    grid, stream, function, flags, scratch, rest = call[:3], call[3], call[4], call[5:7], call[7], call[8:]
    assert grid == (3, 2, 5) and stream == 77 and function == 1234 and flags == (False, False)
    if scratch_bytes:
        assert sizes == [3 * 2 * 5 * scratch_bytes] and scratch.numel() == sizes[0]
    else:
        assert sizes == [] and scratch is None
    assert rest == (None, (4, 1, 0), None, None, None, "a", "b", 64)


def test_scratch_allocator_is_set_only_around_a_launch_and_only_when_unset():
    import triton
    from triton.runtime import _allocation

    from kernels._direct_launch import scratch_allocator
    assert _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
    with scratch_allocator():
        assert _allocation._allocator.get() is not _allocation._NULL_ALLOCATOR
    assert _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
    mine = lambda size, alignment, stream: None
    triton.set_allocator(mine)
    try:
        with scratch_allocator():
            assert _allocation._allocator.get() is mine       # a caller's allocator is kept
    finally:
        triton.set_allocator(_allocation._NULL_ALLOCATOR)
