"""Weight initialization, separate from construction and deterministic under a seed.

GPT-2 (Radford et al. 2019, and the released code): weights N(0, 0.02), biases 0, LayerNorm 1/0,
and the projections that write into the residual stream scaled by 1/sqrt(2·n_layer).
BERT (Devlin et al. 2019, the released code): weights N(0, 0.02) ("truncated" there; plain normal
here), biases 0, LayerNorm 1/0. The rotary decoder follows GPT-2's rule.
"""

import math

import torch
import torch.nn as nn

from .layers import RMSNorm


@torch.no_grad()
def init_weights(model: nn.Module, seed: int | None = None, std: float = 0.02) -> nn.Module:
    config = model.config
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else torch.initial_seed() % 2**63)
    residual_std = std / math.sqrt(2 * config.n_layer) if config.arch != "bert" else std

    def normal_(tensor, scale):
        # Drawn on the CPU so the same seed gives the same weights on any device.
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            is_residual = name.endswith("attn.proj") or name.endswith("mlp.out")
            normal_(module.weight, residual_std if is_residual else std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            normal_(module.weight, std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    if hasattr(model, "head_bias"):
        model.head_bias.zero_()
    return model
