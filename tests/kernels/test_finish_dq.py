"""_finish_dq.py's kernel (the fused backward's dQ scaling) against torch.mul: the same values
written through dQ's strides (the packed qkv op's q slice, a contiguous dQ, packed sequences) and
nowhere else. Bit for bit on a GPU; under the interpreter, whose float32 -> bfloat16 cast
truncates where the GPU's rounds to nearest even, bfloat16 within one unit in the last place."""

import pytest
import torch

from kernels import _backward
from kernels.qkv_packed import split_qkv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["packed", "contiguous", "tokens"])
@pytest.mark.parametrize("head_dim", [64, 80])
def test_the_kernel_writes_torch_mul_values_through_dq_strides(device, dtype, layout, head_dim):
    torch.manual_seed(0)
    batch, seqlen, heads = 2, 70, 3        # 140 rows: a partial last block of 64
    if layout == "packed":
        grads = [torch.full((batch, seqlen, 3 * heads, head_dim), 7.0, dtype=dtype, device=device)
                 for _ in range(2)]
        views = [split_qkv(g, heads)[0] for g in grads]
    elif layout == "contiguous":
        views = [torch.zeros(batch, seqlen, heads, head_dim, dtype=dtype, device=device) for _ in range(2)]
    else:
        views = [torch.zeros(batch * seqlen, heads, head_dim, dtype=dtype, device=device)
                 for _ in range(2)]
    accumulator = 1000 * torch.randn(views[0].shape, dtype=torch.float32, device=device)
    scale = 0.125 if head_dim == 64 else 80 ** -0.5
    _backward.finish_dq(accumulator, scale, views[0], kernel=False)
    _backward.finish_dq(accumulator, scale, views[1], kernel=True)
    if device == "cpu" and dtype == torch.bfloat16:
        torch.testing.assert_close(views[1], views[0], rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(views[0], views[1])
        assert torch.equal(views[1], (accumulator * scale).to(dtype))
    if layout == "packed":      # the k and v slices untouched
        assert all(torch.all(g[:, :, heads:] == 7) for g in grads)
