"""Key/value cache for incremental decoding."""

import torch


class LayerCache:
    """(batch, max_len, kv_heads, head_dim) keys and values of one layer, allocated at the first
    append in the dtype the keys arrive in (under autocast that is the autocast dtype, not the
    weights')."""

    def __init__(self, batch, max_len, kv_heads, head_dim, device):
        self.shape = (batch, max_len, kv_heads, head_dim)
        self.device = device
        self.keys = self.values = None
        self.length = 0

    def append(self, k, v):
        """Store this step's (B, n, Hk, D) keys/values; return views of everything cached so far."""
        if self.keys is None:
            self.keys = torch.empty(self.shape, dtype=k.dtype, device=self.device)
            self.values = torch.empty(self.shape, dtype=v.dtype, device=self.device)
        end = self.length + k.shape[1]
        if end > self.keys.shape[1]:
            raise ValueError(f"KV cache full: {end} positions needed, {self.keys.shape[1]} allocated")
        self.keys[:, self.length:end] = k
        self.values[:, self.length:end] = v
        self.length = end
        return self.keys[:, :end], self.values[:, :end]
