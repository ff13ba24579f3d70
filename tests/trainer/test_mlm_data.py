"""The masked-LM data on tiny corpora made here: masking statistics, fixed target counts, and
sequences packed several to a row."""

import json

import numpy as np
import pytest
import torch

from trainer.data import build_data
from trainer.data.samplers import IGNORE_INDEX

from .test_data import config


def test_mlm_statistics(tmp_path):
    cfg = config(tmp_path, tokenizer="wordpiece", objective="mlm", seqlen=64)
    data = build_data(cfg, batch_size=8, log=lambda *_: None)
    special = data.special
    selected = masked = randomized = kept = real = 0
    for _ in range(data.train._order.batches_per_epoch * 3):
        batch = next(data.train)
        labels, inputs = batch.targets, batch.input_ids
        is_real = (batch.attention_mask == 1) & (inputs != special["cls"]) & (inputs != special["sep"])
        chosen = labels != IGNORE_INDEX
        assert not (chosen & ~(batch.attention_mask == 1)).any()
        real += int(is_real.sum()) + int((chosen & ~is_real).sum())
        selected += int(chosen.sum())
        masked += int((inputs[chosen] == special["mask"]).sum())
        kept += int((inputs[chosen] == labels[chosen]).sum())
        randomized += int(chosen.sum()) - int((inputs[chosen] == special["mask"]).sum()) \
            - int((inputs[chosen] == labels[chosen]).sum())
        assert inputs[0, 0] == special["cls"]
    assert abs(selected / real - 0.15) < 0.02
    assert abs(masked / selected - 0.8) < 0.04
    assert abs((kept + randomized) / selected - 0.2) < 0.04


def test_mlm_max_predictions_gives_each_sequence_a_fixed_target_count(tmp_path):
    # As the original BERT data: min(K, max(1, round(0.15 x length))) targets per sequence, never on
    # [CLS], [SEP] or padding, the same for the same sequence and epoch, 80/10/10 as before.
    cfg = config(tmp_path, tokenizer="wordpiece", objective="mlm", seqlen=64, mlm_max_predictions=6)
    data = build_data(cfg, batch_size=8, log=lambda *_: None)
    special = data.special
    selected = masked = 0
    for _ in range(data.train._order.batches_per_epoch * 2):
        batch = next(data.train)
        chosen = batch.targets != IGNORE_INDEX
        body = batch.attention_mask.sum(1) - 2           # without [CLS] and [SEP]
        expected = torch.clamp(torch.round(0.15 * body.double()).long(), min=1, max=6)
        assert torch.equal(chosen.sum(1), torch.minimum(expected, body))
        assert not chosen[:, 0].any()
        assert not (chosen & (batch.attention_mask == 0)).any()
        assert not chosen.gather(1, (body + 1)[:, None]).any()    # [SEP]
        selected += int(chosen.sum())
        masked += int((batch.input_ids[chosen] == special["mask"]).sum())
    assert abs(masked / selected - 0.8) < 0.05
    again = build_data(cfg, batch_size=8, log=lambda *_: None)
    first, second = data.train.sequence_batch([0, 3], 0), again.train.sequence_batch([0, 3], 0)
    assert torch.equal(first.targets, second.targets) and torch.equal(first.input_ids, second.input_ids)
    with pytest.raises(ValueError, match="mlm_max_predictions"):
        config(tmp_path, objective="mlm", mlm_max_predictions=0)


def test_pack_sequences_fills_rows_without_overflowing_them():
    from trainer.data.packing import pack_sequences
    generator = np.random.default_rng(0)
    sizes = np.concatenate([np.full(30, 64), generator.integers(3, 60, 200)])
    targets = np.minimum(np.maximum(1, np.round(0.15 * (sizes - 2))), 6).astype(int)
    rows = pack_sequences(sizes, 64, targets, max_targets=8)
    placed = np.concatenate(rows)
    assert sorted(placed.tolist()) == list(range(len(sizes)))            # each sequence once
    assert all(sizes[row].sum() <= 64 and targets[row].sum() <= 8 for row in rows)
    assert len(rows) < 0.75 * len(sizes)           # one per row would be 230 rows
    # Only the tokens bound: within best-fit decreasing's guarantee (11/9 of the fewest rows
    # possible, which is at least the total over 64, and at least the count of sizes over 32).
    untargeted = pack_sequences(sizes, 64)
    fewest = max(-(-sizes.sum() // 64), int((sizes > 32).sum()))
    assert len(untargeted) <= 11 / 9 * fewest + 1
    again = pack_sequences(sizes, 64, targets, max_targets=8)
    assert all(np.array_equal(a, b) for a, b in zip(rows, again)) and len(rows) == len(again)
    with pytest.raises(ValueError, match="sizes must be in"):
        pack_sequences([65], 64)
    with pytest.raises(ValueError, match="more than max_targets"):
        pack_sequences([10], 64, [9], max_targets=8)


@pytest.mark.parametrize("max_predictions", [None, 6])
def test_mlm_packed_rows_hold_the_same_sequences_as_padded_rows(tmp_path, max_predictions):
    # Every sequence appears once per epoch, written and masked exactly as when it has a row of its
    # own; cu_seqlens marks each sequence and each row's padding; rows are fuller than unpacked.
    cfg = config(tmp_path, tokenizer="wordpiece", objective="mlm", seqlen=64,
                 mlm_max_predictions=max_predictions, mlm_pack_sequences=True)
    data = build_data(cfg, batch_size=4, log=lambda *_: None)
    plain = build_data(config(tmp_path, tokenizer="wordpiece", objective="mlm", seqlen=64,
                              mlm_max_predictions=max_predictions), batch_size=4, log=lambda *_: None)
    train = data.train
    assert train.real_fraction > plain.train.real_fraction
    seen = []
    for _ in range(train._order.batches_per_epoch):
        rows = [train.rows[i] for i in train._order.order()[
            train._order.position * 4:(train._order.position + 1) * 4]]
        batch = next(train)
        bounds = batch.cu_seqlens.tolist()
        assert bounds[0] == 0 and bounds[-1] == batch.input_ids.numel() and batch.max_seqlen == 64
        assert all(b > a for a, b in zip(bounds, bounds[1:]))
        flat_inputs, flat_targets = batch.input_ids.flatten(), batch.targets.flatten()
        for row, indices in enumerate(rows):
            offset = row * 64
            for index in indices:
                alone = plain.train.sequence_batch([index], 0)
                size = int(alone.attention_mask.sum())
                assert offset in bounds
                assert torch.equal(flat_inputs[offset:offset + size], alone.input_ids[0, :size])
                assert torch.equal(flat_targets[offset:offset + size], alone.targets[0, :size])
                offset += size
                seen.append(int(index))
            assert int(batch.attention_mask[row].sum()) == offset - row * 64
            if offset < (row + 1) * 64:
                assert offset in bounds                         # the padding: its own document
                assert (batch.targets[row, offset - row * 64:] == IGNORE_INDEX).all()
            if max_predictions:
                assert int((batch.targets[row] != IGNORE_INDEX).sum()) <= max_predictions
    # Each sequence once per epoch: all of them but those in the rows that make no full batch.
    left_over = [int(i) for row in train._order.order()[train._order.batches_per_epoch * 4:]
                 for i in train.rows[row]]
    assert len(seen) == len(set(seen)) and sorted(seen + left_over) == list(range(len(train.starts)))
    # A resume continues the same rows; a state saved packed does not fit the unpacked sampler.
    state = json.loads(json.dumps(train.state_dict()))
    expected = next(train)
    again = build_data(cfg, batch_size=4, log=lambda *_: None).train
    again.load_state_dict(state)
    resumed = next(again)
    assert torch.equal(resumed.input_ids, expected.input_ids)
    assert torch.equal(resumed.cu_seqlens, expected.cu_seqlens)
    with pytest.raises(ValueError, match="samples per epoch"):
        plain.train.load_state_dict(state)
    with pytest.raises(ValueError, match="mlm_pack_sequences"):
        config(tmp_path, mlm_pack_sequences=True)


def test_fixed_segment_counts_give_every_packed_batch_one_shape_and_the_same_segments(tmp_path):
    # For CUDA graphs: cu_seqlens of one length in every batch of an epoch, the batch's own
    # segments first, then empty ones at the end; tokens, targets and positions unchanged.
    from models.masked_lm import positions_in_segments
    cfg = config(tmp_path, tokenizer="wordpiece", objective="mlm", seqlen=64, mlm_max_predictions=6,
                 mlm_pack_sequences=True)
    plain = build_data(cfg, batch_size=4, log=lambda *_: None).train
    fixed = build_data(cfg, batch_size=4, log=lambda *_: None).train
    fixed.fix_segment_count()
    lengths = set()
    for _ in range(fixed._order.batches_per_epoch):
        a, b = next(plain), next(fixed)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
        own = a.cu_seqlens.numel()
        assert b.cu_seqlens.numel() == fixed.cu_length >= own
        assert torch.equal(b.cu_seqlens[:own], a.cu_seqlens)
        assert (b.cu_seqlens[own:] == a.input_ids.numel()).all()
        assert torch.equal(positions_in_segments(b.cu_seqlens, b.input_ids.numel()),
                           positions_in_segments(a.cu_seqlens, a.input_ids.numel()))
        lengths.add(own)
    assert len(lengths) > 1              # the batches' own counts did vary
    unpacked = build_data(config(tmp_path, tokenizer="wordpiece", objective="mlm", seqlen=64),
                          batch_size=4, log=lambda *_: None).train
    with pytest.raises(ValueError, match="only packed MLM rows"):
        unpacked.fix_segment_count()


def test_empty_trailing_segments_leave_the_masked_lm_loss_and_gradients_unchanged(tmp_path):
    from models import build_model
    cfg = config(tmp_path, tokenizer="wordpiece", objective="mlm", seqlen=64, mlm_max_predictions=6,
                 mlm_pack_sequences=True)
    data = build_data(cfg, batch_size=2, log=lambda *_: None)
    batch = next(data.train)
    model = build_model("bert_tiny", seed=0, vocab_size=data.vocab_size, max_seqlen=64, d_model=32,
                        n_head=2, n_layer=2, attention="flash", dropout=0.0, attn_dropout=0.1)

    def loss_and_grads(cu_seqlens):
        model.zero_grad()
        torch.manual_seed(3)             # the same dropout masks
        loss = model(batch.input_ids, batch.attention_mask, targets=batch.targets, max_targets=6,
                     cu_seqlens=cu_seqlens, max_seqlen=64)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    padded = torch.cat([batch.cu_seqlens, batch.cu_seqlens[-1:].repeat(5)])
    loss_a, grads_a = loss_and_grads(batch.cu_seqlens)
    loss_b, grads_b = loss_and_grads(padded)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
