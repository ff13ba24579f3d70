"""Launch compiled Triton kernels with less host time than ``kernel[grid](...)``.

On every launch Triton's JIT binds the ~45 arguments, derives the call's specialization (type and
alignment of each argument), builds a string cache key and launch metadata, and only then calls the
compiled kernel's launcher, whose C code then reads each tensor's ``data_ptr()`` and asks the CUDA
driver about it (``cuPointerGetAttribute``). On the H100 host that costs ~60-100 µs per launch,
three launches per forward+backward: at 512-token sequences the GPU work of a forward+backward
(~0.5-1 ms) then waits on the host (docs/results/attention_notes.md, "host").

``DirectLauncher`` keeps, per kernel, the compiled kernels under a key that holds everything Triton
specializes on (Triton 3.6: a tensor's dtype and 16-byte alignment; an integer's 32/64-bit range,
divisibility by 16 and equality to 1; the type of other scalars; the constexprs and launch options;
the device), and launches them directly. A key seen for the first time goes through Triton's own
path, which compiles (or finds in its cache) exactly the kernel it would have run, so the direct
path never chooses a kernel Triton would not. Under the interpreter, or while a launch hook is
installed (profilers such as proton use them), every launch takes Triton's path.

A launch returns its ``BoundKernel``: the compiled kernel with its constexprs and options fixed.
Callers that know the next launch specializes the same way (``_eager_plan.py``: same shapes, strides,
dtypes, alignment and scalar arguments) call it directly and pass tensor addresses as integers,
which the C launcher takes as they are.
"""

import contextlib

import torch
import triton
from triton import knobs
from triton.runtime import _allocation, driver

from ._launch import INTERPRETED


def _specialization(arg):
    """What Triton's specialization reads of one argument (a refinement of it, never coarser)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if type(arg) is int:
        return arg == 1, arg % 16 == 0, -2**31 <= arg < 2**31, -2**63 <= arg < 2**63
    return type(arg)


def hooks_installed() -> bool:
    """Whether a launch hook (a profiler) wants to see every launch through Triton's path."""
    runtime = knobs.runtime
    return bool(runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls)


class BoundKernel:
    """A compiled kernel with its launch options and constexprs fixed. Call it with a 3-D grid, the
    current stream and the runtime arguments in signature order; tensors may be passed as their
    ``data_ptr()`` integers."""

    def __init__(self, compiled, constexprs):
        launcher = compiled.run
        # Triton's launcher object only adds scratch-buffer allocation around the C launch function.
        # A kernel that needs none, or only global scratch (tensor descriptors made on the device,
        # _forward_tma.py), is launched through the C function itself, with the scratch
        # allocated here; profiler scratch keeps Triton's path.
        known = all(hasattr(launcher, name) for name in
                    ("launch", "global_scratch_size", "profile_scratch_size", "num_ctas"))
        if not known or launcher.profile_scratch_size:
            self._launch, self._flags = launcher, None
        else:
            self._launch = launcher.launch
            self._flags = (launcher.launch_cooperative_grid, launcher.launch_pdl)
            self._scratch_bytes = launcher.global_scratch_size * launcher.num_ctas
        self._function = compiled.function
        self._metadata = compiled.packed_metadata
        self._constexprs = constexprs

    def __call__(self, grid, stream, *args):
        if self._flags is None:
            with scratch_allocator():
                self._launch(grid[0], grid[1], grid[2], stream, self._function, self._metadata,
                             None, None, None, *args, *self._constexprs)
            return
        scratch = None
        if self._scratch_bytes:
            scratch = _cuda_scratch(grid[0] * grid[1] * grid[2] * self._scratch_bytes, 128, stream)
        self._launch(grid[0], grid[1], grid[2], stream, self._function, *self._flags, scratch, None,
                     self._metadata, None, None, None, *args, *self._constexprs)


def _cuda_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # The caching allocator's blocks are 512-byte aligned, more than Triton asks for (128).
    return torch.empty(size, dtype=torch.uint8, device="cuda")


@contextlib.contextmanager
def scratch_allocator():
    """Let Triton's own launch path allocate kernel scratch (tensor descriptors built on the device)
    through PyTorch, unless the caller set an allocator. Triton keeps it in a context variable,
    which threads do not inherit (the autograd engine's, recomputing a checkpointed forward), so it
    is set around each launch and restored after."""
    current = _allocation._allocator
    if current.get() is not _allocation._NULL_ALLOCATOR:
        yield
        return
    token = current.set(_cuda_scratch)
    try:
        yield
    finally:
        current.reset(token)


def grid3(grid) -> tuple[int, int, int]:
    return tuple(grid) + (1,) * (3 - len(grid))


def current_stream(device_index: int) -> int:
    return driver.active.get_current_stream(device_index)


class DirectLauncher:
    """``DirectLauncher(kernel)[grid](*args, **constexprs_and_options)`` launches like
    ``kernel[grid](...)``. Runtime arguments must be positional, constexprs by keyword."""

    def __init__(self, kernel: triton.runtime.JITFunction):
        self.kernel = kernel
        self.compiled = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs) -> BoundKernel | None:
        """Launch; returns the bound kernel that ran, or None where Triton's path had to."""
        if INTERPRETED or hooks_installed():
            with scratch_allocator():
                self.kernel[grid](*args, **kwargs)
            return None
        device = driver.active.get_current_device()
        key = (device, tuple(kwargs.items()), tuple(map(_specialization, args)))
        bound = self.compiled.get(key)
        if bound is None:
            with scratch_allocator():
                compiled = self.kernel[grid](*args, **kwargs)
            if hasattr(compiled, "result"):    # Triton's asynchronous compile mode
                compiled = compiled.result()
            # The launcher takes every parameter in signature order, constexprs included.
            trailing = self.kernel.params[len(args):]
            constexprs = tuple(kwargs[p.name] if p.name in kwargs else p.default for p in trailing)
            bound = self.compiled[key] = BoundKernel(compiled, constexprs)
            return bound
        bound(grid3(grid), current_stream(device), *args)
        return bound
