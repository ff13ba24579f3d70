"""Token-level cross entropy."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def padding_bias(padded_vocab: int, vocab_size: int) -> torch.Tensor:
    """(padded_vocab,) float32: 0 in the vocabulary's columns, -inf in the padding columns."""
    bias = torch.zeros(padded_vocab)
    bias[vocab_size:] = float("-inf")
    return bias


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int | None = None,
            aligned: bool = False) -> torch.Tensor:
    """Mean cross entropy over targets != -100, computed in float32 (or
    float64 for float64 logits). logits (B, N, V), targets (B, N).

    ``vocab_size`` < V: the last columns are padding (an embedding table rounded up for matmul
    speed) and take no part in the softmax. They are cut off by slicing, or, with ``aligned``, set
    to -inf in place of the slice: the same loss and gradients, but every row keeps its padded,
    16-byte-aligned length. A compiled graph fuses the mask into the loss kernels, where the
    sliced rows (50257 bf16 values, 100,514 bytes) would force narrow loads and an extra
    zero-padded copy for the gradient. Eagerly the mask costs a pass of its own, so eager callers
    slice. Compiled causal models mask in the head matmul's bias instead (``padding_bias``), which
    leaves the loss kernels an unmasked loss's (models/causal_lm.py)."""
    if logits.dtype != torch.float64:          # float64 (reference tests) stays float64
        logits = logits.float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        if aligned:
            padding = torch.arange(logits.shape[-1], device=logits.device) >= vocab_size
            logits = logits.masked_fill(padding, float("-inf"))
        else:
            logits = logits[..., :vocab_size]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
