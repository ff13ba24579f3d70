"""Key/value cache for incremental decoding."""

import torch


class LayerCache:
    """Preallocated (batch, max_len, kv_heads, head_dim) keys and values of one layer."""

    def __init__(self, batch, max_len, kv_heads, head_dim, dtype, device):
        self.keys = torch.empty(batch, max_len, kv_heads, head_dim, dtype=dtype, device=device)
        self.values = torch.empty_like(self.keys)
        self.length = 0

    def append(self, k, v):
        """Store this step's (B, n, Hk, D) keys/values; return views of everything cached so far."""
        end = self.length + k.shape[1]
        if end > self.keys.shape[1]:
            raise ValueError(f"KV cache full: {end} positions needed, {self.keys.shape[1]} allocated")
        self.keys[:, self.length:end] = k
        self.values[:, self.length:end] = v
        self.length = end
        return self.keys[:, :end], self.values[:, :end]
