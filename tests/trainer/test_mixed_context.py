"""Training windows at two context lengths (data.mix_seqlen): the interleave, equal tokens per
micro-batch, resuming, the errors, and one static compiled graph per shape."""

import numpy as np
import pytest
import torch

from trainer.data import DataConfig, MixedContextWindows
from trainer.data.samplers import CausalWindows
from trainer.data.shards import TokenSplit
from trainer.data.sources import DataError

from .helpers import compose_run, tiny_overrides


def split(tokens: int = 4000) -> TokenSplit:
    return TokenSplit(np.arange(tokens, dtype=np.int64) % 997, np.array([0, tokens]))


def test_short_micro_batches_are_interleaved_evenly_at_equal_tokens():
    windows = MixedContextWindows(split(), seqlen=64, batch_size=2, short_seqlen=16, short_fraction=0.25)
    shapes = [tuple(next(windows).input_ids.shape) for _ in range(40)]
    assert shapes[:8] == [(2, 64), (2, 64), (2, 64), (8, 16)] * 2
    assert shapes.count((8, 16)) == 10
    half = MixedContextWindows(split(), seqlen=64, batch_size=2, short_seqlen=32, short_fraction=0.5)
    assert [tuple(next(half).targets.shape) for _ in range(4)] == [(2, 64), (4, 32)] * 2


def test_each_length_reads_its_own_shuffled_windows():
    # The long micro-batches are exactly what a plain sampler at that length would give.
    windows = MixedContextWindows(split(), seqlen=64, batch_size=2, short_seqlen=16, short_fraction=0.5)
    plain = CausalWindows(split(), 64, 2)
    drawn = [next(windows) for _ in range(6)]
    for batch in drawn[::2]:
        assert torch.equal(batch.input_ids, next(plain).input_ids)
    for batch in drawn[1::2]:       # consecutive tokens, targets shifted by one
        assert torch.equal(batch.targets[:, :-1], batch.input_ids[:, 1:])


def test_resuming_continues_both_samplers_and_the_interleave():
    first = MixedContextWindows(split(), seqlen=64, batch_size=2, short_seqlen=16, short_fraction=0.5)
    for _ in range(7):
        next(first)
    resumed = MixedContextWindows(split(), seqlen=64, batch_size=2, short_seqlen=16, short_fraction=0.5)
    resumed.load_state_dict(first.state_dict())
    for _ in range(5):
        assert torch.equal(next(resumed).input_ids, next(first).input_ids)


def test_a_state_saved_with_other_mix_settings_is_refused():
    mixed = MixedContextWindows(split(), seqlen=64, batch_size=2, short_seqlen=16, short_fraction=0.5)
    other = MixedContextWindows(split(), seqlen=64, batch_size=2, short_seqlen=32, short_fraction=0.5)
    with pytest.raises(ValueError, match="mixed windows of 16 tokens"):
        other.load_state_dict(mixed.state_dict())
    plain = CausalWindows(split(), 64, 2)
    with pytest.raises(ValueError, match="saved with data.mix_seqlen"):
        plain.load_state_dict(mixed.state_dict())
    with pytest.raises(ValueError, match="saved without data.mix_seqlen"):
        mixed.load_state_dict(plain.state_dict())


def test_bad_mix_settings_name_the_problem():
    with pytest.raises(ValueError, match="data.mix_seqlen=48 must be shorter than data.seqlen=64 and divide it"):
        DataConfig(seqlen=64, mix_seqlen=48)
    with pytest.raises(ValueError, match="data.mix_seqlen=64 must be shorter"):
        DataConfig(seqlen=64, mix_seqlen=64)
    with pytest.raises(ValueError, match=r"data.mix_fraction must be in \(0, 1\); got 1.0"):
        DataConfig(seqlen=64, mix_seqlen=16, mix_fraction=1.0)
    with pytest.raises(ValueError, match="needs data.objective=causal"):
        DataConfig(seqlen=64, mix_seqlen=16, objective="mlm")
    with pytest.raises(DataError, match="must be shorter than data.seqlen"):
        MixedContextWindows(split(), seqlen=64, batch_size=2, short_seqlen=24, short_fraction=0.5)


def test_the_trainer_compiles_one_static_graph_per_length(tmp_path, monkeypatch):
    # Unmarked, dynamo's compilation for the second shape would make the batch and length
    # dimensions symbolic; each length must keep its own static graph.
    from trainer import loop
    from trainer.loop import run
    shapes = []

    def recording_backend(graph_module, example_inputs):
        shapes.append([tuple(node.meta["example_value"].shape) for node in graph_module.graph.nodes
                       if node.op == "placeholder" and isinstance(node.meta.get("example_value"), torch.Tensor)
                       and node.meta["example_value"].dtype == torch.int64])
        return graph_module.forward
    monkeypatch.setattr(loop, "compile_model",
                        lambda module, model, mode: torch.compile(module, backend=recording_backend))
    torch._dynamo.reset()
    summary = run(compose_run(tiny_overrides(tmp_path, **{
        "data.mix_seqlen": 8, "trainer.compile": "true", "model.attention": "sdpa",
        "trainer.max_steps": 4, "trainer.eval_interval": 4, "trainer.save_interval": 4})), tmp_path / "run")
    torch._dynamo.reset()
    token_shapes = {shape for graph in shapes for shape in graph}
    assert {(2, 32), (8, 8)} <= token_shapes
    assert all(isinstance(size, int) for shape in token_shapes for size in shape), token_shapes
    assert summary["steps"] == 4
