"""Pieces the Gluon kernels for sm_90 (_forward_gluon.py, _dq_gluon.py, _dkdv_gluon.py) share."""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import tma


@gluon.jit
def head_descriptor(tensor, batch, stride_b, head, stride_h, rows, stride_row,
                    BLOCK_ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
    """TMA descriptor of one (sequence, head) slice of a (batch, rows, heads, HEAD_DIM) tensor, read
    in BLOCK_ROWS x HEAD_DIM boxes (rows past the end arrive as zeros); its ``layout`` is the shared
    memory layout those boxes land in."""
    layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_ROWS, HEAD_DIM],
                                                                tensor.dtype.element_ty)
    return tma.make_tensor_descriptor(tensor + batch.to(gl.int64) * stride_b
                                      + head.to(gl.int64) * stride_h,
                                      [rows, HEAD_DIM], [stride_row, 1], [BLOCK_ROWS, HEAD_DIM],
                                      layout)
