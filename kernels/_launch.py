"""What every launcher shares: where the kernels can run, the tile type, and the problem's geometry.
Which tiles each call gets by default is ``_tile_rules.py``."""

import functools
import os
from dataclasses import dataclass

import torch
import triton

# triton.jit reads TRITON_INTERPRET when a kernel is defined, so the kernels of this process run in
# the interpreter exactly when it was set before this package was imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _teach_interpreter_bf16_dot() -> None:
    """Triton 3.6's interpreter keeps bf16 as raw uint16 bits and multiplies those as integers in
    tl.dot. Widen bf16 operands to float32 first (exact), which is what the tensor cores compute."""
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    plain_dot = InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << 16
        return TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return plain_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    if not getattr(InterpreterBuilder, "_flashtrain_bf16_dot", False):
        InterpreterBuilder.create_dot = create_dot
        InterpreterBuilder._flashtrain_bf16_dot = True


if INTERPRETED:
    _teach_interpreter_bf16_dot()


def check_runnable(device: torch.device) -> None:
    """CUDA runs the compiled kernels; the CPU only the interpreter (slow, for tests)."""
    if device.type == "cuda" or INTERPRETED:
        return
    raise RuntimeError(
        f"flash_attention runs its Triton kernels on CUDA; the inputs are on '{device}'. On a machine "
        "without a GPU, set TRITON_INTERPRET=1 before importing triton or kernels (slow: tests only), "
        "or use another attention path (torch.nn.functional.scaled_dot_product_attention, "
        "kernels.attention_reference).")


@dataclass(frozen=True)
class Geometry:
    """Sizes of one call. For variable-length input, ``batch`` is the number of sequences and
    ``seqlen_q``/``seqlen_k`` are ``max_seqlen``: the extent of the grid and of the dropout layout."""
    batch: int
    heads_q: int
    heads_k: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    varlen: bool

    @property
    def group_size(self) -> int:
        return self.heads_q // self.heads_k

    @property
    def block_d(self) -> int:
        # tl.dot needs every dimension >= 16 and a power of two; extra columns are masked to zero.
        return max(16, triton.next_power_of_2(self.head_dim))


def call_geometry(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor | None,
                  max_seqlen: int) -> Geometry:
    """The geometry of a (checked) flash_attention call, padded or packed."""
    if cu_seqlens is None:
        return Geometry(q.shape[0], q.shape[2], k.shape[2], q.shape[1], k.shape[1], q.shape[3],
                        varlen=False)
    return Geometry(cu_seqlens.shape[0] - 1, q.shape[1], k.shape[1], max_seqlen, max_seqlen,
                    q.shape[2], varlen=True)


# A sliding window (left, right): query i sees keys i - left .. i + right (on the bottom-right
# aligned diagonal); -1 leaves that side unbounded. Causal attention bounds the right side at 0.
Window = tuple[int, int]
NO_WINDOW: Window = (-1, -1)


def band_flags(causal: bool, window: Window) -> dict:
    """The kernels' constexprs: which sides of the band are bounded (see _tiles.py)."""
    return dict(UPPER=causal or window[1] >= 0, LOWER=window[0] >= 0)


def band_offsets(causal: bool, window: Window) -> tuple[int, int]:
    """(window_left, window_right) kernel arguments; an unbounded side's value is unused (0)."""
    left, right = window
    return max(left, 0), 0 if causal else max(right, 0)


def batched_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; a packed variable-length tensor has no batch axis."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs are for tests and references, so their products must not drop to tf32. On the
    GPU, tf32x3 (three tf32 products, ~float32 accurate) keeps them on the tensor cores; a plain
    float32 FMA dot of a 128x64x256 tile compiles for minutes. The interpreter is exact anyway."""
    if dtype != torch.float32:
        return "tf32"     # ignored for fp16/bf16 operands
    return "ieee" if INTERPRETED else "tf32x3"


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # Forward only: the kernel that loads through tensor descriptors (_forward_tma.py), where the
    # call qualifies (sm_90+, fp16/bf16, padded input; _hopper.py); else the portable kernel.
    tma: bool = False
    # The Gluon kernel for sm_90: forward (_forward_gluon.py) and dQ (_dq_gluon.py), num_stages
    # counting their K/V stages, or dK/dV (_dkdv_gluon.py), counting its Q/dO stages; where the
    # call qualifies (_hopper.gluon_device and the kernel's gluon_*call).
    gluon: bool = False
    # dK/dV only: the pass also adds dQ into a float32 buffer by atomic adds, and the dQ pass
    # computes delta alone (FlashAttention-2's single pass): the portable pass
    # (_backward_kernels.py), or with gluon the Gluon one (_dkdv_gluon.py, ACCUMULATE_DQ).
    fused: bool = False
    # Forward only, with gluon: the ping-pong kernel (_forward_pingpong.py): block_m // 64 consumer
    # warpgroups (2 or 3) and a producer warp, in a persistent grid; num_warps is one warpgroup's
    # (4), num_stages its K/V stages. head_major: its tiles ordered head by head, else query block
    # by query block.
    pingpong: bool = False
    head_major: bool = False
    # dK/dV only, with gluon and fused: the warp-specialized pass (_dkdv_warp_specialized.py), two
    # consumer warpgroups of 64 keys each (block_n 128, one warpgroup's num_warps 4) over 64-query
    # blocks, and a producer warp; num_stages counts its Q/dO stages.
    warp_specialized: bool = False
    # With warp_specialized: that pass in a persistent grid (_dkdv_ws_persistent.py), one program
    # per SM walking the key blocks, where q, k, v and the output gradient are rows of one matrix.
    persistent: bool = False
    # With persistent: buffers of a tile's K and V (1 or 2). With 2, the producer loads the next
    # tile's K and V while the consumers still read this tile's; it needs the shared memory of
    # another K/V tile (head dim 64: 164 -> 197 KB; at 128 it does not fit).
    kv_buffers: int = 1
    # With warp_specialized: with dropout the keep-masks are generated by two warps of their own
    # and handed to the consumers in shared memory (_dropout_mask_partition.py).
    mask_partition: bool = False
    # With warp_specialized: dK and dV stored from the consumers' registers, as before v37, instead
    # of through shared memory by TMA (the default where the call allows it:
    # _backward.key_gradients_by_tma).
    register_grads: bool = False

    def __post_init__(self):
        # Dropout tiles are built from whole Philox counters: 32 columns by 16 rows (_philox.py).
        if self.block_n % 32 or self.block_m % 16 or self.block_m < 16:
            raise ValueError(f"tiles need block_n a multiple of 32 and block_m of 16; got {self}")
        if self.tma and self.gluon:
            raise ValueError(f"tiles choose one kernel, TMA or Gluon; got {self}")
        if self.fused and self.tma:
            raise ValueError(f"the fused backward has no TMA kernel; got {self}")
        if self.pingpong and not (self.gluon and self.block_m in (128, 192) and self.num_warps == 4
                                  and not self.fused):
            raise ValueError("ping-pong tiles are Gluon forward tiles of 2 or 3 warpgroups' 64 rows "
                             f"(block_m 128 or 192, num_warps 4); got {self}")
        if self.head_major and not self.pingpong:
            raise ValueError(f"head_major orders the ping-pong kernel's tiles; got {self}")
        if self.warp_specialized and not (self.gluon and self.fused and self.block_m == 64
                                          and self.block_n == 128 and self.num_warps == 4
                                          and self.num_stages >= 2):
            raise ValueError("warp-specialized tiles are fused Gluon dK/dV tiles of 64 queries, two "
                             "warpgroups' 64 keys (block_n 128, num_warps 4) and at least 2 stages; "
                             f"got {self}")
        if self.persistent and not self.warp_specialized:
            raise ValueError(f"persistent runs the warp-specialized dK/dV pass; got {self}")
        if self.kv_buffers not in (1, 2) or (self.kv_buffers == 2 and not self.persistent):
            raise ValueError(f"kv_buffers is 1, or 2 in the persistent pass; got {self}")
        if self.mask_partition and not self.warp_specialized:
            raise ValueError(f"mask_partition is an option of the warp-specialized pass; got {self}")
        if self.register_grads and not self.warp_specialized:
            raise ValueError(f"register_grads is an option of the warp-specialized pass; got {self}")


def capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability, asked of the driver once per device."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)
