"""Launch plans: what a call's shapes fix, derived once and reused by every call (eager calls and
the custom ops that compiled graphs call).

At 512-token sequences an H100 does a forward+backward's work in ~0.6 ms, about as long as the
host takes to issue it (docs/results/attention_notes.md, "host"). Most of that host time went to
re-deriving per call what the shapes already fix: the geometry, the tile sizes and grids, ~40 stride
and scalar arguments per kernel, and Triton's specialization of each of them.

A plan is keyed on everything those depend on: q's, k's and v's shapes and strides, the dtype, the
device (and the current one, which Triton compiles for), the number of sequences and max_seqlen
of packed input, scale, causal, dropout_p, the window, and whether
``torch.use_deterministic_algorithms`` is on (it turns the fused backward, whose dQ is summed by
atomic adds, into the two passes).
Its first forward and first backward run the ordinary launch path and keep the static arguments and
the bound kernels. Later calls with the same key allocate their outputs and launch those kernels
with only what changes per call: the tensors' addresses (as integers: the launcher then skips a
driver query per tensor), the dropout seed and offset.

Three things are checked per call because the key does not fix them: every address 16-byte aligned
(Triton specializes on it; the bound kernels are all aligned ones), the output gradient's strides,
and the strides of gradients written into given views (the packed qkv op's slices). A call that
differs takes the ordinary path, which handles any case. So do all calls under the interpreter or
while a launch hook (a profiler) is installed. The fused backward (``_backward_kernels.py``) is
replayed with its float32 dQ buffer and final scaling.
"""

import torch

from . import _backward, _forward
from ._direct_launch import current_stream, hooks_installed
from ._launch import call_geometry, check_runnable
from ._philox import philox_counters, seed_arguments


# Plans are small (a few tuples); the cap only bounds a run whose shapes never repeat
# (variable-length batches with ever new max_seqlen).
_PLANS: dict = {}
MAX_PLANS = 512


def plan_for(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, dropout_p, window_left=-1,
             window_right=-1, seed_in_memory=False) -> "EagerPlan":
    """``seed_in_memory``: the calls pass a ``_philox.device_seed`` tensor, which the bound kernels
    read from memory (a constexpr of their own)."""
    device = q.device
    key = (q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, device,
           torch._C._cuda_getDevice() if device.type == "cuda" else -1,
           None if cu_seqlens is None else cu_seqlens.shape[0], max_seqlen, softmax_scale, causal,
           dropout_p, window_left, window_right, seed_in_memory,
           torch.are_deterministic_algorithms_enabled())
    plan = _PLANS.get(key)
    if plan is None:
        plan = EagerPlan(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, dropout_p,
                         (window_left, window_right))
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class EagerPlan:
    """Forward and backward launches of one plan key (see the module docstring)."""

    def __init__(self, q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, dropout_p,
                 window=(-1, -1)):
        check_runnable(q.device)
        self.geometry = call_geometry(q, k, cu_seqlens, max_seqlen)
        g = self.geometry
        self.philox_counters = philox_counters(g.batch, g.heads_q, g.seqlen_q, g.seqlen_k)
        self.options = (softmax_scale, causal, dropout_p)
        self.window = window
        self.device_index = q.device.index
        self._forward = None    # (bound kernel, grid, static arguments) once bound
        self._backward = None   # (grad_out strides, that triple for dQ, for dK/dV) once bound

    def forward(self, q, k, v, cu_seqlens, seed, offset):
        out, lse = _forward.new_outputs(q, self.geometry)
        addresses = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                     _address(cu_seqlens))
        if self._forward is not None and not _misaligned(addresses) and not hooks_installed():
            kernel, grid, static = self._forward
            kernel(grid, current_stream(self.device_index), *addresses, *_per_call_seed(seed, offset),
                   *static)
            return out, lse
        launched = _forward.launch_into(out, lse, q, k, v, cu_seqlens, self.geometry,
                                        *self.options, seed, offset, window=self.window)
        if launched[0] is not None and not _misaligned(addresses):
            self._forward = launched
        return out, lse

    def backward(self, grad_out, q, k, v, out, lse, cu_seqlens, seed, offset, grads=None):
        """``(dq, dk, dv)``: new contiguous tensors, or written into ``grads`` (views may be strided,
        e.g. the slices of one packed qkv gradient)."""
        delta, dq, dk, dv = (_backward.new_gradients(q, k, v, lse) if grads is None
                             else (torch.empty_like(lse), *grads))
        # What the bound launches' static arguments fix beyond the plan key.
        strides = (grad_out.stride(), None if grads is None else tuple(g.stride() for g in grads))
        bound = self._backward
        if bound is not None and bound[0] == strides and not hooks_installed():
            _, (dq_kernel, dq_grid, dq_static), (dkdv_kernel, dkdv_grid, dkdv_static), dq_scale = bound
            # The fused pass adds dQ into a float32 buffer; two passes write dQ directly.
            dq_sum = dq if dq_scale is None else _backward.new_dq_accumulator(dq)
            addresses = (q.data_ptr(), k.data_ptr(), v.data_ptr(), grad_out.data_ptr(), out.data_ptr(),
                         lse.data_ptr(), delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                         dq_sum.data_ptr(), _address(cu_seqlens))
            if not _misaligned(addresses):
                qa, ka, va, ga, oa, la, da, dqa, dka, dva, dsa, ca = addresses
                per_call = (ca, *_per_call_seed(seed, offset))
                stream = current_stream(self.device_index)
                # In the kernels' signature order (_backward_kernels.py); dQ first: it writes delta for
                # dK/dV (the fused backward's dQ pass writes only delta).
                dq_kernel(dq_grid, stream, qa, ka, va, ga, oa, la, da, dqa, *per_call, *dq_static)
                dkdv_kernel(dkdv_grid, stream, qa, ka, va, ga, la, da, dka, dva, dsa, *per_call,
                            *dkdv_static)
                if dq_scale is not None:
                    _backward.finish_dq(dq_sum, dq_scale, dq)
                return dq, dk, dv
        addresses = (q.data_ptr(), k.data_ptr(), v.data_ptr(), grad_out.data_ptr(), out.data_ptr(),
                     lse.data_ptr(), delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                     _address(cu_seqlens))
        dq_launch, dkdv_launch, dq_scale = _backward.launch_into(
            delta, dq, dk, dv, grad_out, q, k, v, out, lse, cu_seqlens, self.geometry,
            *self.options, seed, offset, window=self.window)
        if dq_launch[0] is not None and dkdv_launch[0] is not None and not _misaligned(addresses):
            self._backward = (strides, dq_launch, dkdv_launch, dq_scale)
        return dq, dk, dv


def _per_call_seed(seed, offset) -> tuple[int, int]:
    """The seed and counter base arguments of a bound launch (a device seed by its address)."""
    argument, counter_base, in_memory = seed_arguments(seed, offset)
    return (argument.data_ptr() if in_memory else argument), counter_base


def _misaligned(addresses) -> bool:
    combined = 0
    for address in addresses:
        combined |= address or 0
    return bool(combined & 15)
