"""The stock-PyTorch GPT-2 baseline: what a PyTorch user writes without flashtrain.

Plain PyTorch, no flashtrain imports, in the nanoGPT style, and as strong as that user would make
it: one fused qkv ``nn.Linear``, ``scaled_dot_product_attention(is_causal=True)`` (PyTorch picks its
fastest backend), a tied output head, the cross entropy inside the compiled function, bf16
autocast, fused AdamW with decay on matrices only, gradient clipping, batches in pinned memory
copied without blocking, and the loss read back only when the caller asks for it.
``scripts/bench_train.py`` times it against the flashtrain trainer in the same process.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class StockConfig:
    vocab_size: int = 50304          # rounded up to a multiple of 64, as nanoGPT does
    seqlen: int = 1024
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    attn_dropout: float = 0.0
    dropout: float = 0.0             # embedding and residual dropout


class Block(nn.Module):
    def __init__(self, config: StockConfig):
        super().__init__()
        self.config = config
        self.ln_1, self.ln_2 = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model)
        self.c_proj = nn.Linear(config.d_model, config.d_model)
        self.c_fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.mlp_proj = nn.Linear(4 * config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        batch, seqlen, width = x.shape
        heads = self.config.n_head
        q, k, v = self.c_attn(self.ln_1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, seqlen, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        p = self.config.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(batch, seqlen, width)
        x = x + self.dropout(self.c_proj(y))
        return x + self.dropout(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")))


class StockGPT(nn.Module):
    def __init__(self, config: StockConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.seqlen, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers).
        for name, parameter in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(parameter)
            elif parameter.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(parameter, 0.0, std)

    def forward(self, idx, targets):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)          # tied head
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), fused=True)


def to_device(inputs: torch.Tensor, targets: torch.Tensor, device):
    return (inputs.pin_memory().to(device, non_blocking=True),
            targets.pin_memory().to(device, non_blocking=True))


def train_step(forward, model, optimizer, inputs, targets, grad_clip: float = 1.0):
    """One optimizer step; returns the loss as a device tensor (no host synchronization)."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = forward(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
