"""Which calls the Hopper kernels (``_forward_tma.py``, ``_forward_gluon.py``,
``_forward_pingpong.py``, ``_dq_gluon.py``, ``_dkdv_gluon.py``, ``_dkdv_warp_specialized.py``,
``_dkdv_ws_persistent.py``) can take, and their launch with a fallback to the portable kernel.

All read their tiles through tensor descriptors (TMA, sm_90 and later) for fp16/bf16 and padded
input (packed input would need a descriptor per sequence). The Gluon kernels issue warpgroup MMAs
(sm_90 only) and take only what they were written for: no window, whole blocks, head dims 64 and
128, the causal mask only with as many queries as keys (and for dK/dV one query head per kv-head),
and dropout with blocks of 16 queries and 32 keys (the keep-mask's counter blocks). Every other
call runs the portable kernel.
"""

import warnings

import torch
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

from ._launch import INTERPRETED, capability

# (kernel name, constexprs and options) that failed to compile or to fit: the portable kernel runs
# those calls. Tuning scripts read it to tell a fallback from a measurement.
FALLBACKS: set = set()


def supported(tensors, varlen: bool) -> bool:
    """Whether a call can take the TMA forward: sm_90 or later, fp16 or bf16, padded input, and
    what TMA needs of each tensor it reads (16-byte aligned base and row strides, contiguous
    head_dim rows of at least 16 bytes). The interpreter runs any dtype (tests)."""
    if varlen:
        return False
    first = tensors[0]
    if not INTERPRETED and (first.device.type != "cuda" or first.dtype == torch.float32
                            or capability(first.device) < (9, 0)):
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or t.shape[-1] * size < 16:
            return False
        if any(stride * size % 16 for stride in t.stride()[:-1]):
            return False
    return True


def gluon_supported(tensors, varlen: bool, causal: bool, window, dropout_p: float, seqlen_q: int,
                    seqlen_k: int, head_dim: int, block_n: int) -> bool:
    """Whether a call can take the Gluon forward: a call its schedule covers, on sm_90."""
    return (gluon_call(causal, window, dropout_p, seqlen_q, seqlen_k, head_dim, block_n)
            and gluon_device(tensors, varlen))


def gluon_device(tensors, varlen: bool) -> bool:
    """What every Gluon kernel needs of a call besides its schedule: what the TMA forward needs
    (``tensors``: those it reads by TMA), on sm_90 exactly (warpgroup MMAs do not exist on later
    GPUs), and no interpreter (it cannot run Gluon)."""
    if INTERPRETED or tensors[0].device.type != "cuda" or capability(tensors[0].device)[0] != 9:
        return False
    return supported(tensors, varlen)


def gluon_call(causal: bool, window, dropout_p: float, seqlen_q: int, seqlen_k: int, head_dim: int,
               block_n: int) -> bool:
    """The calls the Gluon forward's schedule covers: no window, head dim 64 or 128, whole key
    blocks (it masks no ragged end), with the causal mask as many queries as keys (its mask is the
    plain diagonal), and with dropout key blocks of 32 columns (the keep-mask's counter blocks)."""
    return (window[0] < 0 and window[1] < 0 and head_dim in (64, 128)
            and seqlen_k >= block_n and seqlen_k % block_n == 0
            and (not causal or seqlen_q == seqlen_k) and (dropout_p == 0 or block_n % 32 == 0))


def pingpong_supported(tensors, varlen: bool, causal: bool, window, dropout_p: float,
                       seqlen_q: int, seqlen_k: int, head_dim: int, block_n: int) -> bool:
    """Whether a call can take the ping-pong forward (``_forward_pingpong.py``): the Gluon
    forward's calls, on sm_90, with q, k and v each readable as one matrix of (batch x seqlen)
    rows and (heads x head_dim) columns (one TMA descriptor per tensor), and queries in whole
    64-row blocks (each consumer's block of O leaves by one TMA store); with dropout, key blocks
    of whole 32-column counter blocks (``_philox.py``)."""
    return (seqlen_q % 64 == 0 and (dropout_p == 0 or block_n % 32 == 0)
            and gluon_call(causal, window, 0.0, seqlen_q, seqlen_k, head_dim, block_n)
            and gluon_device(tensors, varlen)
            and all(rows_of_one_matrix(t) for t in tensors))


def rows_of_one_matrix(t: torch.Tensor) -> bool:
    """Whether a (batch, seqlen, heads, head_dim) tensor's sequences follow each other as rows of
    one matrix (batch stride = seqlen x row stride) with its heads side by side in each row (head
    stride = head_dim): true of contiguous tensors and of q, k, v sliced from one packed qkv."""
    return t.stride(0) == t.shape[1] * t.stride(1) and t.stride(2) == t.shape[3]


def gluon_dq_call(causal: bool, window, dropout_p: float, seqlen_q: int, seqlen_k: int,
                  head_dim: int, block_m: int, block_n: int) -> bool:
    """The calls the Gluon dQ schedule covers: the forward's, and whole query blocks too (it reads
    lse and writes δ and dQ unmasked), and dropout too (its keep-mask from ``_philox_gluon``, in
    16-row and 32-column blocks)."""
    dropout_blocks = dropout_p == 0 or (block_m % 16 == 0 and block_n % 32 == 0)
    return (gluon_call(causal, window, 0.0, seqlen_q, seqlen_k, head_dim, block_n)
            and seqlen_q >= block_m and seqlen_q % block_m == 0 and dropout_blocks)


def gluon_dkdv_call(causal: bool, window, dropout_p: float, seqlen_q: int, seqlen_k: int,
                    head_dim: int, group_size: int, block_m: int, block_n: int) -> bool:
    """The calls the Gluon dK/dV schedules cover, the warp-specialized one's
    (``_dkdv_warp_specialized.py``) included: the dQ pass's, with one query head per kv-head."""
    return (gluon_dq_call(causal, window, dropout_p, seqlen_q, seqlen_k, head_dim, block_m, block_n)
            and group_size == 1)


def masked(causal: bool, window, length: int, block: int) -> bool:
    """The TMA forward's MASKED constexpr: a band (causal or a window), or a ragged last key block."""
    return causal or window[0] >= 0 or window[1] >= 0 or length % block != 0


def _compile_failure(error: Exception) -> bool:
    """Triton refusing a kernel, as opposed to an error of the call: its front end, ptxas, the
    shared-memory limit, or an MLIR pass (reported as a RuntimeError)."""
    if isinstance(error, (CompilationError, OutOfResources, PTXASError)):
        return True
    return isinstance(error, RuntimeError) and "PassManager::run failed" in str(error)


def launch(launcher, portable, grid, args, options: dict, portable_launch=None):
    """Launch ``launcher`` (a Hopper kernel or ``portable``); if Triton cannot compile the Hopper
    kernel for these options, warn once and launch the portable kernel instead: with the grid,
    arguments and options ``portable_launch()`` returns where given (a kernel whose launch differs
    from the portable one's), else with the same grid and arguments and the options but
    ``HOPPER_ONLY_OPTIONS``. Returns what the launch returns."""
    if launcher is portable:
        return portable.launch(grid, args, options)
    if not fell_back(launcher, options):
        try:
            return launcher.launch(grid, args, options)
        except Exception as error:  # noqa: BLE001 - only compile failures are handled, see above
            if not _compile_failure(error):
                raise
            FALLBACKS.add(_fallback_key(launcher, options))
            warnings.warn(f"{launcher.kernel.__name__} did not compile for {dict(options)} "
                          f"({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
                          f"the portable kernel runs these calls", RuntimeWarning, stacklevel=3)
    if portable_launch is not None:
        return portable.launch(*portable_launch())
    portable_options = {name: value for name, value in options.items()
                        if name not in HOPPER_ONLY_OPTIONS}
    return portable.launch(grid, args, portable_options)


# Constexprs of the Hopper kernels that the portable ones do not take: a fallback leaves them out,
# since Triton refuses a keyword argument its kernel does not have.
HOPPER_ONLY_OPTIONS = ("MASKED", "KV_STAGES", "STAGES", "KV_BUFFERS", "TMA_GRADS", "MASK_PARTITION",
                       "ORDER_GROUP", "HEAD_MAJOR", "SCHEDULE")


def fell_back(launcher, options: dict) -> bool:
    """Whether ``launcher`` failed to compile for ``options`` (the portable kernel runs them)."""
    return bool(FALLBACKS) and _fallback_key(launcher, options) in FALLBACKS


def _fallback_key(launcher, options: dict) -> tuple:
    return (launcher.kernel.__name__, tuple(sorted(options.items())))
