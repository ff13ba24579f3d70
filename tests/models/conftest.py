import pytest
import torch

from models import build_model


@pytest.fixture
def tiny():
    """Small configs of each architecture (no downloads; random weights)."""
    def make(arch, **overrides):
        name = {"gpt2": "gpt2_tiny", "bert": "bert_tiny", "rope": "rope_tiny"}[arch]
        settings = dict(vocab_size=97, max_seqlen=64, d_model=64, n_head=4, n_layer=2)
        if arch == "rope":
            settings["n_kv_head"] = 2
        settings.update(overrides)
        return build_model(name, seed=0, **settings)
    return make


@pytest.fixture
def tokens():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (2, 23), generator=generator)
