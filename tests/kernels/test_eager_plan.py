"""Eager calls launch through per-signature plans (kernels/_eager_plan.py). A plan must reproduce
the ordinary launch path exactly: same kernels, same arguments, same dropout draw. Under the
interpreter a plan always takes the ordinary path; on a GPU its later calls take the bound one."""

import pytest
import torch

from kernels import _backward, _direct_launch, _eager_plan, _forward, flash_attention
from kernels._launch import call_geometry
from kernels._philox import next_seed_offset, philox_counters
from kernels._launch import Tiles

from .numerics import random_qkv

SCALE = 0.2     # passed explicitly: the plan key holds the scale as given

def _op_path(q, k, v, grad_out, seed, causal, dropout_p, cu_seqlens=None, max_seqlen=0):
    """Triton's launch path, no plan: the forward and backward launchers called directly, with the
    dropout seed and offset drawn as a call draws them."""
    torch.manual_seed(seed)
    geometry = call_geometry(q, k, cu_seqlens, max_seqlen)
    seed_offset = (next_seed_offset(q.device, philox_counters(geometry.batch, geometry.heads_q,
                                                              geometry.seqlen_q, geometry.seqlen_k))
                   if dropout_p > 0 else (0, 0))
    options = (geometry, SCALE, causal, dropout_p, *seed_offset)
    out, lse = _forward.forward(q, k, v, cu_seqlens, *options)
    return (out, *_backward.backward(grad_out, q, k, v, out, lse, cu_seqlens, *options))


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


@pytest.mark.gpu
def test_bound_fused_backward_matches_the_ordinary_path_on_gpu():
    """Head dim 64 with dropout: the default backward is the fused pass, whose bound replay adds dQ
    into its own float32 buffer and scales it. dK and dV are written per key block (bitwise equal);
    dQ is summed by atomic adds, so its last bits depend on the order the blocks finish."""
    q, k, v = random_qkv((2, 1024, 4, 64), (2, 1024, 4, 64), torch.bfloat16, "cuda")
    grad_out = torch.randn(q.shape, device="cuda").to(q.dtype)
    theirs = _op_path(q, k, v, grad_out, 8, True, 0.1)
    for seed in (8, 8, 8):      # the first call binds the plan, the later ones replay it
        ours = _eager_path(q, k, v, grad_out, seed, True, 0.1)
        for name, mine, other in zip(("out", "dk", "dv"), (ours[0], *ours[2:]), (theirs[0], *theirs[2:])):
            assert torch.equal(mine, other), f"{name} differs from the ordinary launch path"
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-2, atol=1e-2)
    plan = _eager_plan.plan_for(q, k, v, None, 0, SCALE, True, 0.1)
    assert plan._backward is not None and plan._backward[3] is not None, "the fused pass never bound"


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


def _attend_eagerly(q, k, v):
    return flash_attention(q, k, v, causal=True, dropout_p=0.1, softmax_scale=0.3)


def _attend_through_the_op(q, k, v):
    """The custom op a compiled graph calls (its autograd included)."""
    return torch.ops.flashtrain.flash_attention_forward(q, k, v, None, 0, 0.3, True, 0.1)[0]


def _attend_packed(qkv, heads_k):
    """The packed op: its backward writes dQ, dK, dV into strided slices of one gradient."""
    return torch.ops.flashtrain.flash_attention_qkv_forward(qkv, heads_k, None, 0, 0.3, True, 0.1)[0]


def _packed(q, k, v):
    qkv = torch.cat((q, k, v), dim=2).detach().requires_grad_()
    return (qkv,), lambda: _attend_packed(qkv, k.shape[2])


# Per entry point: (leaves to differentiate, a call) for q, k, v.
ENTRIES = {"eager": lambda q, k, v: ((q, k, v), lambda: _attend_eagerly(q, k, v)),
           "custom op": lambda q, k, v: ((q, k, v), lambda: _attend_through_the_op(q, k, v)),
           "packed op": _packed}


@pytest.fixture
def recorded_launches(monkeypatch):
    """Kernel launches recorded instead of run, as ``(kernel name, "ordinary" or "bound", grid,
    arguments)`` with tensors as ("address", data_ptr). CPU tensors, on any machine: the kernels never
    run, so neither the interpreter nor a GPU is needed."""
    calls = []

    def record(name, path, grid, args):
        calls.append((name, path, tuple(grid), tuple(
            ("address", a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)))

    def ordinary_launch(self, grid, args, kwargs):
        name = self.kernel.fn.__name__
        record(name, "ordinary", grid, args)
        return lambda bound_grid, stream, *bound_args: record(name, "bound", bound_grid, bound_args)

    monkeypatch.setattr(_direct_launch.DirectLauncher, "launch", ordinary_launch)
    monkeypatch.setattr(_eager_plan, "check_runnable", lambda device: None)
    monkeypatch.setattr(_eager_plan, "current_stream", lambda device_index: 0)
    monkeypatch.setattr(_eager_plan, "_PLANS", {})     # these fake bound kernels stay in here
    return calls


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("fused", [False, True], ids=["two passes", "fused backward"])
def test_bound_launches_pass_what_the_ordinary_path_passes(recorded_launches, monkeypatch, entry, fused):
    """The bound path lists each kernel's arguments itself (addresses, then seed and offset, then the
    static ones). A plan's second call must take the bound launches and pass exactly what its first
    (ordinary) call passed: the same grids and scalars, the same input addresses, and an address
    wherever the ordinary path passed a tensor. Eager calls and the custom ops that compiled graphs
    call share the plans."""
    calls = recorded_launches
    if fused:
        monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: Tiles(16, 32, 1, 1, fused=True))
    q, k, v = random_qkv((2, 48, 4, 32), (2, 48, 2, 32), torch.float32, "cpu")
    grad_out = torch.randn(q.shape)
    leaves, attend = ENTRIES[entry](q, k, v)
    inputs = {t.data_ptr() for t in (q, k, v, grad_out, *leaves)}
    for _ in range(2):
        torch.manual_seed(7)        # the same seed and offset in both calls
        torch.autograd.grad(attend(), leaves, grad_out)
    # The fused backward's dQ finishing kernel follows it in every call, through its own launcher:
    # a plan binds the three attention passes.
    finish = ["_finish_dq_kernel"] if fused else []
    assert [name for name, *_ in calls] == ["_forward_kernel", "_dq_kernel", "_dkdv_kernel", *finish] * 2
    calls = [call for call in calls if call[0] != "_finish_dq_kernel"]
    assert [path for _, path, *_ in calls] == ["ordinary"] * 3 + ["bound"] * 3
    for (name, _, grid, ordinary), (_, _, bound_grid, bound) in zip(calls[:3], calls[3:]):
        assert bound_grid == grid + (1,) * (3 - len(grid)), name
        assert len(bound) == len(ordinary), name
        for position, (expected, got) in enumerate(zip(ordinary, bound)):
            if isinstance(expected, tuple):          # a tensor: its address, as an integer
                assert type(got) is int, (name, position)
                if expected[1] in inputs:
                    assert got == expected[1], (name, position)
            else:
                assert got == expected, (name, position)


def test_deterministic_algorithms_do_not_replay_a_fused_backward(recorded_launches, monkeypatch):
    """A plan made while deterministic algorithms are off binds the fused backward (dQ summed by
    atomic adds, in no fixed order). Once they are on, calls of the same signature take a plan of
    their own, whose backward is the two passes."""
    calls = recorded_launches
    monkeypatch.setattr(_backward, "dkdv_tiles", lambda *args, **kwargs: Tiles(16, 32, 1, 1, fused=True))
    q, k, v = random_qkv((2, 48, 4, 32), (2, 48, 2, 32), torch.float32, "cpu")
    grad_out = torch.randn(q.shape)
    torch.autograd.grad(_attend_eagerly(q, k, v), (q, k, v), grad_out)
    torch.use_deterministic_algorithms(True)
    try:
        torch.autograd.grad(_attend_eagerly(q, k, v), (q, k, v), grad_out)
    finally:
        torch.use_deterministic_algorithms(False)
    assert [name for name, *_ in calls] == ["_forward_kernel", "_dq_kernel", "_dkdv_kernel",
                                            "_finish_dq_kernel",        # fused: dQ's finishing step
                                            "_forward_kernel", "_dq_kernel", "_dkdv_kernel"]
    assert [path for _, path, *_ in calls] == ["ordinary"] * 7
    fused_plan, deterministic_plan = _eager_plan._PLANS.values()
    assert fused_plan is not deterministic_plan


def test_gradients_into_views_with_other_strides_do_not_replay_a_binding(recorded_launches):
    """The packed op and the split op over the same q, k, v views share a plan, but write their
    gradients with different strides (slices of one tensor against three): each binding replays
    only for calls with its own strides."""
    qkv = torch.randn(2, 48, 6, 32, requires_grad=True)
    q, k, v = qkv.split(2, dim=2)
    for attend in (lambda: _attend_packed(qkv, 2), lambda: _attend_packed(qkv, 2),
                   lambda: _attend_through_the_op(q, k, v)):
        out = attend()
        torch.autograd.grad(out, qkv, torch.randn(out.shape))
    # forward, dQ, dK/dV per call: the packed op binds, then replays; the split op's backward does not.
    assert [path for _, path, *_ in recorded_launches] == ["ordinary"] * 3 + ["bound"] * 3 + ["bound"] + ["ordinary"] * 2
