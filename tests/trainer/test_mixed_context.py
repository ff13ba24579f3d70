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


def documents_split(tokens: int = 4000) -> TokenSplit:
    """Documents of 37 tokens, so that windows hold document starts at varying places."""
    return TokenSplit(np.arange(tokens, dtype=np.int64) % 997, np.arange(0, tokens + 1, 37).clip(max=tokens))


def test_packed_short_micro_batches_are_the_same_windows_as_long_rows():
    plain = MixedContextWindows(documents_split(), seqlen=64, batch_size=2, short_seqlen=16,
                                short_fraction=0.5, document_aware=True)
    packed = MixedContextWindows(documents_split(), seqlen=64, batch_size=2, short_seqlen=16,
                                 short_fraction=0.5, document_aware=True)
    packed.pack_into_long_rows()
    for index in range(6):
        a, b = next(plain), next(packed)
        assert tuple(b.input_ids.shape) == (2, 64) and b.max_seqlen == 64
        assert torch.equal(a.input_ids.reshape(-1), b.input_ids.reshape(-1))
        assert torch.equal(a.targets.reshape(-1), b.targets.reshape(-1))
        assert torch.equal(a.cu_seqlens, b.cu_seqlens)
        if index % 2:           # a short one: a cut at the end of every 16-token window
            assert set(range(0, 129, 16)) <= set(b.cu_seqlens.tolist())
    with pytest.raises(DataError, match="needs data.document_aware=true"):
        MixedContextWindows(split(), seqlen=64, batch_size=2, short_seqlen=16,
                            short_fraction=0.5).pack_into_long_rows()


@pytest.mark.parametrize("arch", ["rope", "gpt2"])
def test_a_packed_short_batch_computes_the_same_loss_and_gradients_on_a_rotary_model(arch):
    """What makes packing exact for rotary models, and why it is not done for learned positions:
    the same windows as rows of 16 or laid end to end in rows of 64, attention cut at every window."""
    from models import build_model
    settings = dict(vocab_size=997, max_seqlen=64, d_model=32, n_head=2, n_layer=2, attention="flash",
                    dropout=0.0, attn_dropout=0.0)
    if arch == "rope":
        settings["n_kv_head"] = 1
    model = build_model(f"{arch}_tiny", seed=0, **settings)
    windows = MixedContextWindows(documents_split(), seqlen=64, batch_size=1, short_seqlen=16,
                                  short_fraction=0.5, document_aware=True)
    next(windows)
    short = next(windows)                     # four windows of 16 tokens
    long_rows = short.input_ids.reshape(1, 64), short.targets.reshape(1, 64)

    def loss_and_grads(input_ids, targets, max_seqlen):
        model.zero_grad()
        loss = model(input_ids, None, targets=targets, cu_seqlens=short.cu_seqlens, max_seqlen=max_seqlen)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_a, grads_a = loss_and_grads(short.input_ids, short.targets, 16)
    loss_b, grads_b = loss_and_grads(*long_rows, 64)
    if arch == "gpt2":      # positions 16..63 are other learned vectors: a different computation
        assert not torch.allclose(loss_a, loss_b, atol=1e-3)
        return
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_the_trainer_packs_short_windows_for_rotary_models_into_one_shape(tmp_path, monkeypatch):
    from trainer import loop
    from trainer.loop import run
    shapes = []
    original = loop.Trainer._loss

    def recording(self, batch):
        shapes.append(tuple(batch.input_ids.shape))
        return original(self, batch)
    monkeypatch.setattr(loop.Trainer, "_loss", recording)
    overrides = {"model": "rope_tiny", "model.n_head": 2, "data.mix_seqlen": 8, "data.document_aware": "true",
                 "model.attention": "flash", "model.dropout": 0.0, "model.attn_dropout": 0.0,
                 "trainer.max_steps": 4, "trainer.eval_interval": 4, "trainer.save_interval": 4}
    run(compose_run(tiny_overrides(tmp_path, **overrides)), tmp_path / "packed")
    assert set(shapes) == {(2, 32)}
    shapes.clear()
    run(compose_run(tiny_overrides(tmp_path, **overrides, **{"data.mix_pack": "false"})), tmp_path / "plain")
    assert set(shapes) == {(2, 32), (8, 8)}


def test_the_long_context_recipe_fine_tunes_a_rotary_run_end_to_end(tmp_path):
    """finetune_long_rope's mechanics at toy size: a rotary run continued at 4x its context with the
    NTK base, three micro-batches in four at the old context, packed into long rows."""
    from trainer.loop import run
    rope = {"model": "rope_tiny", "model.n_head": 2, "data.document_aware": "true", "model.attention": "flash",
            "model.dropout": 0.0, "model.attn_dropout": 0.0, "data.seqlen": 16}
    run(compose_run(tiny_overrides(tmp_path, **rope, **{"trainer.max_steps": 2})), tmp_path / "short")
    summary = run(compose_run(tiny_overrides(tmp_path, **{**rope, "data.seqlen": 64}, **{
        "data.mix_seqlen": 16, "data.mix_fraction": 0.75, "model.extend_method": "ntk",
        "model.init_from": str(tmp_path / "short" / "model.pt"),
        "data.tokenizer_file": str(tmp_path / "short" / "tokenizer.json"), "trainer.max_steps": 4,
        "trainer.eval_interval": 4, "trainer.save_interval": 4})), tmp_path / "long")
    state = torch.load(tmp_path / "long" / "model.pt", weights_only=True)
    assert state["config"]["max_seqlen"] == 64 and summary["steps"] == 4
    assert np.isfinite(summary["final_loss"])
    log = (tmp_path / "long" / "train.log").read_text()
    assert "context extended 16 -> 64 positions (rotary base raised, NTK-aware)" in log
    assert "short windows run 4 to a row of 64 tokens" in log
