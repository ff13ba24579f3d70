"""Construct a model from a config or a size name."""

from .causal_lm import CausalLM
from .config import ModelConfig
from .init import init_weights
from .masked_lm import MaskedLM
from .sizes import named_config


def build_model(config: ModelConfig | str, *, init: bool = True, seed: int | None = None, **overrides):
    """A model for ``config`` (a ModelConfig or a size name such as "gpt2_small"), initialized with
    the paper's rule under ``seed`` unless ``init=False`` (e.g. before loading weights)."""
    if isinstance(config, str):
        config = named_config(config, **overrides)
    elif overrides:
        config = config.with_(**overrides)
    model = MaskedLM(config) if config.arch == "bert" else CausalLM(config)
    if init:
        init_weights(model, seed)
    return model
