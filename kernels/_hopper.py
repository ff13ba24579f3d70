"""Which calls the Hopper kernels (``_forward_hopper.py``, ``_dkdv_hopper.py``) can take.

Those kernels read their tiles through tensor descriptors (TMA) and run one warp-specialized loop.
Triton 3.6 specializes such a loop only without an early exit (which packed variable-length input
needs for short sequences) and for fp16/bf16 products (docs/results/attention_notes.md, v7); each
kernel adds its own limits on dropout. Every other call runs the portable kernels.
"""

import torch

from ._launch import INTERPRETED


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
