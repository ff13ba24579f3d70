"""Launch plans for eager calls: what a call's shapes fix, derived once and reused.

At 512-token sequences an H100 does a forward+backward's work in ~0.6 ms, about as long as the
host takes to issue it (docs/results/attention_notes.md, "host"). Most of that host time went to
re-deriving per call what the shapes already fix: the geometry, the tile sizes and grids, ~40 stride
and scalar arguments per kernel, and Triton's specialization of each of them.

A plan is keyed on everything those depend on: q's, k's and v's shapes and strides, the dtype, the
device (and the current one, which Triton compiles for), the number of sequences and max_seqlen
of packed input, scale, causal and dropout_p.
Its first forward and first backward run the ordinary launch path and keep the static arguments and
the bound kernels. Later calls with the same key allocate their outputs and launch those kernels
with only what changes per call: the tensors' addresses (as integers: the launcher then skips a
driver query per tensor), the dropout seed and offset.

Two things are checked per call because the key does not fix them: every address 16-byte aligned
(Triton specializes on it; the bound kernels are all aligned ones) and the output gradient's
strides. A call that differs takes the ordinary path, which handles any case. So do all calls under
the interpreter or while a launch hook (a profiler) is installed.
"""

import torch

from . import _backward, _forward
from ._direct_launch import current_stream, grid3, hooks_installed
from ._launch import call_geometry, check_runnable
from ._philox import kernel_counter_base, kernel_seed, philox_counters


# Plans are small (a few tuples); the cap only bounds a run whose shapes never repeat (variable-length
# batches with ever new max_seqlen).
_PLANS: dict = {}
MAX_PLANS = 512


def plan_for(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, dropout_p) -> "EagerPlan":
    device = q.device
    key = (q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, device,
           torch._C._cuda_getDevice() if device.type == "cuda" else -1,
           None if cu_seqlens is None else cu_seqlens.shape[0], max_seqlen, softmax_scale, causal,
           dropout_p)
    plan = _PLANS.get(key)
    if plan is None:
        plan = EagerPlan(q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, dropout_p)
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class EagerPlan:
    """Forward and backward launches of one plan key (see the module docstring)."""

    def __init__(self, q, k, v, cu_seqlens, max_seqlen, softmax_scale, causal, dropout_p):
        check_runnable(q.device)
        self.geometry = call_geometry(q, k, cu_seqlens, max_seqlen)
        g = self.geometry
        self.philox_counters = philox_counters(g.batch, g.heads_q, g.seqlen_q, g.seqlen_k)
        self.options = (softmax_scale, causal, dropout_p)
        self.device_index = q.device.index
        self._forward = None    # (bound kernel, grid, static arguments) once bound
        self._backward = None   # (grad_out strides, dQ and dK/dV bound kernels, grids, statics)

    def forward(self, q, k, v, cu_seqlens, seed, offset):
        out, lse = _forward.new_outputs(q, self.geometry)
        addresses = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                     _address(cu_seqlens))
        per_call = (kernel_seed(seed), kernel_counter_base(offset))
        if self._forward is not None and not _misaligned(addresses) and not hooks_installed():
            kernel, grid, static = self._forward
            kernel(grid, current_stream(self.device_index), *addresses, *per_call, *static)
            return out, lse
        grid, static, options = _forward.launch_config(q, k, v, out, lse, self.geometry,
                                                       *self.options)
        kernel = _forward.FORWARD.launch(grid, (q, k, v, out, lse, cu_seqlens, *per_call, *static),
                                         options)
        if kernel is not None and not _misaligned(addresses):
            self._forward = (kernel, grid3(grid), static)
        return out, lse

    def backward(self, grad_out, q, k, v, out, lse, cu_seqlens, seed, offset):
        delta, dq, dk, dv = _backward.new_gradients(q, k, v, lse)
        addresses = (q.data_ptr(), k.data_ptr(), v.data_ptr(), grad_out.data_ptr(), out.data_ptr(),
                     lse.data_ptr(), delta.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                     _address(cu_seqlens))
        per_call = (kernel_seed(seed), kernel_counter_base(offset))
        bound = self._backward
        if (bound is not None and bound[0] == grad_out.stride() and not _misaligned(addresses)
                and not hooks_installed()):
            _, dq_kernel, dq_grid, dq_static, dkdv_kernel, dkdv_grid, dkdv_static = bound
            qa, ka, va, ga, oa, la, da, dqa, dka, dva, ca = addresses
            stream = current_stream(self.device_index)
            dq_kernel(dq_grid, stream, qa, ka, va, ga, oa, la, da, dqa, ca, *per_call, *dq_static)
            dkdv_kernel(dkdv_grid, stream, qa, ka, va, ga, la, da, dka, dva, ca, *per_call,
                        *dkdv_static)
            return dq, dk, dv
        (dq_grid, dq_static, dq_options), (dkdv_grid, dkdv_static, dkdv_options) = \
            _backward.launch_configs(grad_out, q, k, v, out, lse, dq, dk, dv, self.geometry,
                                     *self.options)
        # dQ first: it also writes delta, which dK/dV reads.
        dq_kernel = _backward.DQ.launch(
            dq_grid, (q, k, v, grad_out, out, lse, delta, dq, cu_seqlens, *per_call, *dq_static),
            dq_options)
        dkdv_kernel = _backward.DKDV.launch(
            dkdv_grid, (q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens, *per_call,
                        *dkdv_static), dkdv_options)
        if dq_kernel is not None and dkdv_kernel is not None and not _misaligned(addresses):
            self._backward = (grad_out.stride(), dq_kernel, grid3(dq_grid), dq_static,
                              dkdv_kernel, grid3(dkdv_grid), dkdv_static)
        return dq, dk, dv


def _misaligned(addresses) -> bool:
    combined = 0
    for address in addresses:
        combined |= address or 0
    return bool(combined & 15)
