"""flashtrain's attention kernels: ``flash_attention`` (Triton) and ``attention_reference`` (PyTorch).

Imports only torch and triton. See ``flash_attention.py`` for features and limits.
"""

from .flash_attention import flash_attention
from .qkv_packed import flash_attention_qkvpacked
from .reference import attention_reference, causal_mask, visible_mask

__all__ = ["flash_attention", "flash_attention_qkvpacked", "attention_reference", "causal_mask", "visible_mask"]
