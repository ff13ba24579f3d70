"""AdamW with decay on matrices only, and the warmup + decay learning-rate schedule."""

import math

import torch

from .config import OptimConfig


def build_optimizer(model: torch.nn.Module, config: OptimConfig, device: torch.device):
    """Weight decay on 2-D weights (matmuls, embeddings); none on biases and norm gains."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                             fused=device.type == "cuda")


def lr_factor(step: int, config: OptimConfig, max_steps: int) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup, then the chosen decay."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    floor = config.min_lr_ratio
    # Warmup-stable-decay (Hu et al. 2024, MiniCPM; Hägele et al. 2024): the decay starts where its
    # last decay_fraction of the steps does, or right after a warmup longer than the rest.
    decay_start = config.warmup_steps
    if config.schedule == "wsd":
        decay_start = max(config.warmup_steps, max_steps - round(config.decay_fraction * max_steps))
        if step < decay_start:
            return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    if config.schedule in ("linear", "wsd"):
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, config: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config, max_steps))
