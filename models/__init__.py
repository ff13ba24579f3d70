"""flashtrain's model zoo: GPT-2, BERT and a rotary/GQA decoder on ``kernels.flash_attention``.

    from models import build_model, load_hf, save_hf, generate
    model = build_model("gpt2_small", vocab_size=50304, attention="flash")
"""

from .build import build_model
from .checkpoint import load_model, save_model
from .config import ModelConfig
from .extend import extend_context
from .flops import flops_per_token
from .generate import generate
from .hf import load_hf, save_hf
from .init import init_weights
from .loss import IGNORE_INDEX, lm_loss
from .sizes import named_config, size_names

__all__ = ["ModelConfig", "build_model", "named_config", "size_names", "init_weights", "load_hf",
           "save_hf", "save_model", "load_model", "generate", "extend_context", "flops_per_token", "lm_loss", "IGNORE_INDEX"]
