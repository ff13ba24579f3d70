"""Which calls the Hopper kernels (``_forward_hopper.py``, ``_dq_hopper.py``, ``_dkdv_hopper.py``)
can take, and their launch with a fallback to the portable kernels.

Those kernels read their tiles through tensor descriptors (TMA) and run one warp-specialized loop.
Triton 3.6 specializes such a loop only without an early exit (which packed variable-length input
needs for short sequences) and for fp16/bf16 products (docs/results/attention_notes.md, v7); each
kernel adds its own limits on dropout. Every other call runs the portable kernels.
"""

import warnings

import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

from ._launch import INTERPRETED

# (kernel name, constexprs and options) that failed to compile or to fit: the portable kernel runs
# those calls. Tuning scripts read it to tell a fallback from a measurement.
FALLBACKS: set = set()


def supported(tensors, varlen: bool) -> bool:
    """Whether a call can take the Hopper kernels: sm_90 or later, fp16 or bf16, padded input, and
    what TMA needs of each tensor it reads (16-byte aligned base and row strides, contiguous
    head_dim rows of at least 16 bytes). The interpreter runs any dtype (tests)."""
    if varlen:
        return False
    first = tensors[0]
    if not INTERPRETED and (first.device.type != "cuda" or first.dtype == torch.float32
                            or torch.cuda.get_device_capability(first.device) < (9, 0)):
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or t.shape[-1] * size < 16:
            return False
        if any(stride * size % 16 for stride in t.stride()[:-1]):
            return False
    return True


def masked(causal: bool, window, length: int, block: int) -> bool:
    """The kernels' MASKED constexpr: a band (causal or a window), or a ragged last block of the
    streamed axis (keys for the forward and dQ, queries for dK/dV)."""
    return causal or window[0] >= 0 or window[1] >= 0 or length % block != 0


def _compile_failure(error: Exception) -> bool:
    """Triton refusing a kernel, as opposed to an error of the call: its front end, ptxas, the
    shared-memory limit, or an MLIR pass (the warp-specialization pass fails on some shapes of
    these kernels and reports it as a RuntimeError)."""
    if isinstance(error, (CompilationError, OutOfResources, PTXASError)):
        return True
    return isinstance(error, RuntimeError) and "PassManager::run failed" in str(error)


def launch(launcher, portable, grid, args, options: dict):
    """Launch ``launcher`` (a Hopper kernel or ``portable``); if Triton cannot compile the Hopper
    kernel for these options, warn once and launch the portable kernel instead (same grid and
    arguments; it takes the options but ``MASKED``). Returns what the launch returns."""
    if launcher is portable:
        return portable.launch(grid, args, options)
    key = (launcher.kernel.__name__, tuple(sorted(options.items()))) if FALLBACKS else None
    if key is None or key not in FALLBACKS:
        try:
            return launcher.launch(grid, args, options)
        except Exception as error:  # noqa: BLE001 - only compile failures are handled, see above
            if not _compile_failure(error):
                raise
            FALLBACKS.add((launcher.kernel.__name__, tuple(sorted(options.items()))))
            warnings.warn(f"{launcher.kernel.__name__} did not compile for {dict(options)} "
                          f"({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
                          f"the portable kernel runs these calls", RuntimeWarning, stacklevel=3)
    portable_options = {name: value for name, value in options.items() if name != "MASKED"}
    return portable.launch(grid, args, portable_options)
