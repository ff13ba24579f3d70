"""GPU-only trainer checks: compile modes that capture CUDA graphs, with the flash kernel."""

import pytest
import torch
from torch._dynamo.utils import counters

from trainer.loop import Trainer

from .helpers import compose_run, tiny_overrides

pytestmark = pytest.mark.gpu


def _losses(tmp_path, mode: str) -> list[float]:
    torch._dynamo.reset()
    counters.clear()
    overrides = tiny_overrides(tmp_path, **{"trainer.device": "cuda", "trainer.precision": "bf16",
                                            "model.attention": "flash", "model.dropout": 0.0,
                                            "model.attn_dropout": 0.0, "trainer.compile": "true",
                                            "trainer.compile_mode": mode})
    trainer = Trainer(compose_run(overrides), tmp_path / mode)
    try:
        return [float(trainer.train_step()["loss"]) for _ in range(6)]
    finally:
        trainer.close()


def test_reduce_overhead_captures_the_flash_step_and_trains_like_the_default_mode(tmp_path):
    """Without attention dropout, no CPU tensor is left in the graph, so inductor captures it (a
    skipped capture would only show as a counter and a log line), and the losses follow the
    uncaptured mode's: each replay's outputs are consumed before the next one overwrites them."""
    default = _losses(tmp_path, "default")
    graphed = _losses(tmp_path, "reduce-overhead")
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(default), rtol=2e-2, atol=2e-2)
