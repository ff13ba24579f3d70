"""Eager calls launch through per-signature plans (kernels/_eager_plan.py). A plan must reproduce
the ordinary launch path exactly: same kernels, same arguments, same dropout draw. Under the
interpreter a plan always takes the ordinary path; on a GPU its later calls take the bound one."""

import pytest
import torch

from kernels import _direct_launch, _eager_plan, flash_attention

from .numerics import random_qkv

SCALE = 0.2     # passed explicitly: the plan key holds the scale as given

def _op_path(q, k, v, grad_out, seed, causal, dropout_p, cu_seqlens=None, max_seqlen=0):
    """The custom op with its autograd: Triton's launch path, no plan."""
    torch.manual_seed(seed)
    out = torch.ops.flashtrain.flash_attention_forward(q, k, v, cu_seqlens, max_seqlen, SCALE,
                                                       causal, dropout_p)[0]
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def _eager_path(q, k, v, grad_out, seed, causal, dropout_p, cu_seqlens=None, max_seqlen=None):
    torch.manual_seed(seed)
    out = flash_attention(q, k, v, causal=causal, dropout_p=dropout_p, softmax_scale=SCALE,
                          cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def _assert_identical(ours, theirs):
    for name, mine, other in zip(("out", "dq", "dk", "dv"), ours, theirs):
        assert torch.equal(mine, other), f"{name} differs from the ordinary launch path"


def _dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def _repeats(device, calls):
    """The calls that exercise a plan. On a GPU the calls after a signature's first take the bound
    launches; under the interpreter every call takes the ordinary path, so repeating a signature
    adds nothing there but time: keep each distinct call once, in order."""
    if device == "cuda":
        return calls
    kept = []
    for call in calls:
        if not any(call is seen for seen in kept):
            kept.append(call)
    return kept


def _fused_qkv(device, dtype):
    """q, k, v as strided views of one (B, N, 3, H, D) projection, as a model makes them."""
    qkv = torch.randn(2, 48, 3, 2, 32, device=device).to(dtype)
    return [qkv[:, :, i].detach().requires_grad_() for i in range(3)]


CASES = {
    "causal, dropout": lambda device, dtype: random_qkv((2, 48, 2, 32), (2, 48, 2, 32), dtype,
                                                        device),
    "grouped-query": lambda device, dtype: random_qkv((2, 40, 4, 32), (2, 56, 2, 32), dtype,
                                                      device),
    "fused QKV views": _fused_qkv,
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_plan_reproduces_the_ordinary_launch_path_bit_for_bit(device, case, dropout_p):
    q, k, v = CASES[case](device, _dtype(device))
    grad_out = torch.randn(q.shape, device=device).to(q.dtype)
    for seed in (1, 2) if device == "cuda" else (1,):   # the first call builds the plan, the second reuses it
        theirs = _op_path(q, k, v, grad_out, seed, True, dropout_p)
        _assert_identical(_eager_path(q, k, v, grad_out, seed, True, dropout_p), theirs)
    plan = _eager_plan.plan_for(q, k, v, None, 0, SCALE, True, dropout_p)
    if device == "cuda":
        assert plan._forward is not None and plan._backward is not None, "plan never bound"


def test_plan_reproduces_variable_length_calls(device):
    dtype = _dtype(device)
    q, k, v = random_qkv((70, 2, 32), (70, 2, 32), dtype, device)
    grad_out = torch.randn(q.shape, device=device).to(dtype)
    for lengths in ([30, 40], [10, 20, 40], [5, 25, 40], [40, 30]) if device == "cuda" else ([30, 40], [10, 20, 40]):
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()],
                                  dtype=torch.int32, device=device)
        theirs = _op_path(q, k, v, grad_out, 4, True, 0.2, cu_seqlens, 40)
        _assert_identical(_eager_path(q, k, v, grad_out, 4, True, 0.2, cu_seqlens, 40), theirs)
    if device == "cuda":
        plan = _eager_plan.plan_for(q, k, v, cu_seqlens, 40, SCALE, True, 0.2)
        assert plan._forward is not None and plan._backward is not None, "plan never bound"


def test_output_gradient_with_other_strides_takes_the_ordinary_path(device):
    dtype = _dtype(device)
    q, k, v = random_qkv((2, 48, 2, 32), (2, 48, 2, 32), dtype, device)
    contiguous = torch.randn(q.shape, device=device).to(dtype)
    # (B, H, N, D) memory seen as (B, N, H, D): unit stride along head_dim, other strides differ.
    heads_major = torch.randn(2, 2, 48, 32, device=device).to(dtype).transpose(1, 2)
    for grad_out in _repeats(device, (contiguous, heads_major, contiguous, heads_major)):
        _assert_identical(_eager_path(q, k, v, grad_out, 5, False, 0.2),
                          _op_path(q, k, v, grad_out, 5, False, 0.2))


def test_misaligned_inputs_take_the_ordinary_path(device):
    """Same shapes and strides as an aligned call (so the same plan), but q starts 2 elements into
    its storage: not 16-byte aligned, which Triton compiles differently."""
    dtype = _dtype(device)
    shape = (2, 48, 2, 32)
    q, k, v = random_qkv(shape, shape, dtype, device)
    storage = torch.randn(q.numel() + 2, device=device).to(dtype)
    q_shifted = storage[2:].view(shape).requires_grad_()
    with torch.no_grad():
        q_shifted.copy_(q)
    assert q_shifted.data_ptr() % 16 != 0 and q_shifted.stride() == q.stride()
    grad_out = torch.randn(shape, device=device).to(dtype)
    for query in _repeats(device, (q, q_shifted, q)):
        _assert_identical(_eager_path(query, k, v, grad_out, 6, True, 0.0),
                          _op_path(query, k, v, grad_out, 6, True, 0.0))


def test_one_plan_per_call_signature(device):
    q, k, v = random_qkv((1, 16, 2, 16), (1, 16, 2, 16), torch.float32, device)
    plan = _eager_plan.plan_for(q, k, v, None, 0, 0.25, True, 0.0)
    assert _eager_plan.plan_for(q.detach().clone(), k, v, None, 0, 0.25, True, 0.0) is plan
    for other in ((q, k, v, None, 0, 0.5, True, 0.0), (q, k, v, None, 0, 0.25, False, 0.0),
                  (q, k, v, None, 0, 0.25, True, 0.1), (q, k, v, None, 0, 0.25, True, 0.0, 4, -1),
                  (q[:, :8], k, v, None, 0, 0.25, True, 0.0),
                  (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, None, 0, 0.25, True, 0.0)):
        assert _eager_plan.plan_for(*other) is not plan
    packed = q[0]
    two, three = (torch.tensor(bounds, dtype=torch.int32, device=device)
                  for bounds in ([0, 8, 16], [0, 4, 8, 16]))
    assert (_eager_plan.plan_for(packed, packed, packed, two, 8, 0.25, True, 0.0)
            is not _eager_plan.plan_for(packed, packed, packed, three, 8, 0.25, True, 0.0))


def test_bound_launches_pass_what_the_ordinary_path_passes(monkeypatch):
    """The bound path lists each kernel's arguments itself (addresses, then seed and offset, then the
    static ones). With launches recorded instead of run, a plan's second call must pass exactly what
    its first (ordinary) call passed: the same grids and scalars, the same input addresses, and an
    address wherever the ordinary path passed a tensor. Runs without a GPU."""
    calls = []

    def record(name, grid, args):
        calls.append((name, tuple(grid), tuple(
            ("address", a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)))

    def ordinary_launch(self, grid, args, kwargs):
        name = self.kernel.fn.__name__
        record(name, grid, args)
        return lambda bound_grid, stream, *bound_args: record(name, bound_grid, bound_args)

    monkeypatch.setattr(_direct_launch.DirectLauncher, "launch", ordinary_launch)
    monkeypatch.setattr(_eager_plan, "current_stream", lambda device_index: 0)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})     # these fake bound kernels stay in here
    q, k, v = random_qkv((2, 48, 4, 32), (2, 48, 2, 32), torch.float32, "cpu")
    grad_out = torch.randn(q.shape)
    inputs = {t.data_ptr() for t in (q, k, v, grad_out)}
    for _ in range(2):
        torch.manual_seed(7)        # the same seed and offset in both calls
        out = flash_attention(q, k, v, causal=True, dropout_p=0.1, softmax_scale=0.3)
        torch.autograd.grad(out, (q, k, v), grad_out)
    assert [name for name, _, _ in calls] == ["_forward_kernel", "_dq_kernel", "_dkdv_kernel"] * 2
    for (name, grid, ordinary), (_, bound_grid, bound) in zip(calls[:3], calls[3:]):
        assert bound_grid == grid + (1,) * (3 - len(grid)), name
        assert len(bound) == len(ordinary), name
        for position, (expected, got) in enumerate(zip(ordinary, bound)):
            if isinstance(expected, tuple):          # a tensor: its address, as an integer
                assert type(got) is int, (name, position)
                if expected[1] in inputs:
                    assert got == expected[1], (name, position)
            else:
                assert got == expected, (name, position)
