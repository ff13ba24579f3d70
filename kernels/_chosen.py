"""Which kernels a call runs: the names of the forward, dQ and dK/dV kernels the library launches for
these tensors and options, after the compile fallbacks seen so far in this process. Benchmarks
store them beside their timings, so that a record says what it measured and a later change of
default is visible against it."""

import torch

from . import _backward, _forward, _hopper
from ._launch import NO_WINDOW, Window, call_geometry


def _ran(launcher, portable, options: dict) -> str:
    """The kernel that runs a launch: ``launcher``'s, or the portable one's if it fell back; with
    two K/V buffers the persistent dK/dV pass is named so (one kernel, two schedules)."""
    if launcher is not portable and _hopper.fell_back(launcher, options):
        return portable.kernel.__name__
    buffers = options.get("KV_BUFFERS", 1)
    return launcher.kernel.__name__ + (f" (KV_BUFFERS={buffers})" if buffers != 1 else "")


def chosen_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                   causal: bool = False, dropout_p: float = 0.0, window: Window = NO_WINDOW,
                   forward_tiles=None, backward_tiles=None) -> dict[str, str]:
    """``{"forward": ..., "dq": ..., "dkdv": ...}``: kernel names for a padded (batch, seqlen, heads,
    head_dim) call with the default tiles (or a caller's: ``forward_tiles``, ``backward_tiles`` =
    (dK/dV tiles, dQ tiles)) and a seed given on the host (a device seed, as in CUDA graphs,
    compiles separate variants, which can fall back separately)."""
    geometry = call_geometry(q, k, None, 0)
    out, lse = _forward.new_outputs(q, geometry)
    scale = geometry.head_dim ** -0.5
    forward, _, _, forward_options = _forward.launch_config(q, k, v, out, lse, geometry, scale,
                                                            causal, dropout_p, forward_tiles,
                                                            window=window)
    (dq, _, _, dq_options), (dkdv, _, _, dkdv_options) = _backward.launch_configs(
        grad_out, q, k, v, out, lse, *_backward.new_gradients(q, k, v, lse)[1:], geometry, scale,
        causal, dropout_p, backward_tiles, window=window)
    return {"forward": _ran(forward, _forward.FORWARD, forward_options),
            "dq": _ran(dq, _backward.DQ, dq_options),
            "dkdv": _ran(dkdv, _backward.DKDV, dkdv_options)}
