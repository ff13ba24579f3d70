"""The fused backward's last step as one Triton kernel: dQ = scale · the float32 dQ sum, cast into
dQ's dtype and written through dQ's own strides.

Why: the fused dK/dV passes add unscaled dQ into a contiguous float32 buffer. Where dQ is a view
(the packed qkv op writes into the q slice of one (batch, seqlen, 3·heads, head_dim) gradient),
``torch.mul(sum, scale, out=dq)`` cannot take PyTorch's vectorized kernel and runs its generic
strided one: 0.52 ms per GPT-2 small step at 4 x 4096 tokens on an H200, about 43 µs a call where
its 75 MB of traffic takes about 16 µs at that card's bandwidth (docs/results/train_notes.md).
Here each program scales a (rows x head_dim) tile of one head with contiguous loads and stores
along head_dim. The values are torch.mul's: a float32 product rounded once to dQ's dtype.
"""

import triton
import triton.language as tl

from ._direct_launch import DirectLauncher

ROWS_PER_PROGRAM = 64


@triton.jit
def _finish_dq_kernel(Sum, DQ, scale, n_rows, seqlen, stride_b, stride_n, stride_h,
                      HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_ROWS: tl.constexpr):
    # Row r is token r of the flattened (batch x seqlen) tokens: sequence r // seqlen, position
    # r % seqlen (packed sequences: one sequence of all tokens).
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    head = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    rows64 = rows.to(tl.int64)
    total = tl.load(Sum + (rows64[:, None] * HEADS + head) * HEAD_DIM + cols[None, :], mask=mask)
    out = (rows64 // seqlen) * stride_b + (rows64 % seqlen) * stride_n + head * stride_h
    tl.store(DQ + out[:, None] + cols[None, :], (total * scale).to(DQ.dtype.element_ty), mask=mask)


FINISH_DQ = DirectLauncher(_finish_dq_kernel)


def finish_dq_kernel(accumulator, scale: float, dq) -> None:
    """dq = scale · accumulator (float32, contiguous in dq's shape); dq (batch, seqlen, heads,
    head_dim) or, packed, (tokens, heads, head_dim), its last dimension contiguous."""
    if dq.dim() == 3:           # packed sequences: one sequence, the token stride twice
        seqlen, stride_b, (stride_n, stride_h, _) = dq.shape[0], 0, dq.stride()
    else:
        seqlen, (stride_b, stride_n, stride_h, _) = dq.shape[1], dq.stride()
    heads, head_dim = dq.shape[-2], dq.shape[-1]
    n_rows = accumulator.numel() // (heads * head_dim)
    grid = (triton.cdiv(n_rows, ROWS_PER_PROGRAM), heads, 1)
    FINISH_DQ[grid](accumulator, dq, float(scale), n_rows, seqlen, stride_b, stride_n, stride_h,
                    HEADS=heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
                    BLOCK_ROWS=ROWS_PER_PROGRAM)
