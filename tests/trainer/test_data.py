"""The data pipeline on tiny corpora made here: sources, tokenizers, shards, samplers, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data import DataConfig, DataError, build_data, load_tokenizer
from trainer.data import shards as shards_module
from trainer.data.samplers import CausalWindows, IGNORE_INDEX
from trainer.data.shards import shard_fingerprint, token_dtype
from trainer.data.sources import load_corpus
from trainer.data.tokenizer import get_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()


def make_corpus(root: Path, documents=40, words=60, seed=0):
    generator = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(documents):
        text = " ".join(generator.choice(WORDS, size=words)) + f"\n# doc {index}\n"
        (root / f"doc{index:03d}.txt").write_text(text)
    return root


def config(tmp_path, **overrides):
    settings = dict(source="files", path=str(make_corpus(tmp_path / "corpus")), vocab_size=300,
                    seqlen=16, cache_dir=str(tmp_path / "cache"), num_proc=1, validation_fraction=0.2,
                    val_windows=4)
    settings.update(overrides)
    return DataConfig(**settings)


def test_round_trip_and_eos_placement(tmp_path):
    cfg = config(tmp_path, shuffle_documents=False)
    data = build_data(cfg, batch_size=2, log=lambda *_: None)
    corpus = load_corpus(cfg)
    split = data.splits["train"]
    eos = data.special["eos"]
    assert split.num_documents == len(corpus.splits["train"])
    for index in (0, 5, split.num_documents - 1):
        start, end = split.offsets[index], split.offsets[index + 1]
        assert split.tokens[end - 1] == eos and eos not in split.tokens[start:end - 1]
        text = data.tokenizer.decode(split.tokens[start:end - 1].tolist())
        assert text == corpus.splits["train"][index]["text"]
    assert split.tokens.dtype == np.uint16


def test_fingerprint_follows_settings(tmp_path):
    cfg = config(tmp_path)
    corpus = load_corpus(cfg)
    _, key = get_tokenizer(cfg, corpus)
    _, same_key = get_tokenizer(cfg, load_corpus(cfg))
    assert key == same_key
    assert shard_fingerprint(corpus, key, 0) == shard_fingerprint(load_corpus(cfg), key, 0)
    _, other_key = get_tokenizer(config(tmp_path, vocab_size=280), corpus)
    assert other_key != key
    (Path(cfg.path) / "doc000.txt").write_text("changed text entirely\n")
    assert load_corpus(cfg).fingerprint != corpus.fingerprint


def test_interrupted_shard_writing_leaves_no_cache(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    real = shards_module._write_split

    def fail_on_validation(table, tokenizer, eos, dtype, directory, split, *rest):
        if split == "validation":
            raise KeyboardInterrupt
        return real(table, tokenizer, eos, dtype, directory, split, *rest)

    monkeypatch.setattr(shards_module, "_write_split", fail_on_validation)
    with pytest.raises(KeyboardInterrupt):
        build_data(cfg, batch_size=2, log=lambda *_: None)
    shard_root = Path(cfg.cache_dir) / "shards"
    assert not any(shard_root.iterdir()), "a partial cache entry was left behind"
    monkeypatch.setattr(shards_module, "_write_split", real)
    assert build_data(cfg, batch_size=2, log=lambda *_: None).splits["validation"].num_documents > 0


def test_windows_cover_the_data_without_overlap(tmp_path):
    data = build_data(config(tmp_path), batch_size=3, log=lambda *_: None)
    windows = CausalWindows(data.splits["train"], 16, batch_size=1, seed=3)
    starts = []
    for _ in range(windows.batches_per_epoch):
        windows_indices = windows._order.next_indices()
        starts.extend(int(i) * 16 for i in windows_indices)
    assert sorted(starts) == list(range(0, windows.num_windows * 16, 16))
    batch = windows.window_batch([2])
    tokens = data.splits["train"].tokens
    assert np.array_equal(batch.input_ids[0].numpy(), tokens[32:48])
    assert np.array_equal(batch.targets[0].numpy(), tokens[33:49])


def test_document_cu_seqlens(tmp_path):
    data = build_data(config(tmp_path, document_aware=True), batch_size=4, log=lambda *_: None)
    batch = next(data.train)
    eos = data.special["eos"]
    flat = batch.input_ids.flatten().numpy()
    bounds = batch.cu_seqlens.numpy()
    assert bounds[0] == 0 and bounds[-1] == flat.size and np.all(np.diff(bounds) > 0)
    # the window length, the same for every batch (a per-batch value would recompile compiled models)
    assert batch.max_seqlen == 16 >= int(np.diff(bounds).max())
    for cut in bounds[1:-1]:
        # every cut is either a window edge or right after an end-of-document token
        assert cut % 16 == 0 or flat[cut - 1] == eos
    after_eos = [i + 1 for i in np.flatnonzero(flat == eos) if (i + 1) % 16]
    assert set(after_eos) <= set(bounds.tolist())


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


def test_resume_gives_identical_next_batches(tmp_path):
    cfg = config(tmp_path)
    data = build_data(cfg, batch_size=2, seed=7, log=lambda *_: None)
    for _ in range(5):
        next(data.train)
    state = json.loads(json.dumps(data.train.state_dict()))     # survives serialization
    expected = [next(data.train).input_ids for _ in range(8)]
    fresh = build_data(cfg, batch_size=2, seed=7, log=lambda *_: None)
    fresh.train.load_state_dict(state)
    for want in expected:
        assert np.array_equal(next(fresh.train).input_ids.numpy(), want.numpy())


def test_rank_shards_are_disjoint_and_complete(tmp_path):
    data = build_data(config(tmp_path), batch_size=1, log=lambda *_: None)
    split = data.splits["train"]
    total = CausalWindows(split, 16, 1).num_windows
    shares = []
    for rank in range(3):
        windows = CausalWindows(split, 16, 1, seed=1, rank=rank, world_size=3)
        shares.append({int(windows._order.next_indices()[0]) for _ in range(windows.batches_per_epoch)})
    assert not (shares[0] & shares[1]) and not (shares[1] & shares[2]) and not (shares[0] & shares[2])
    covered = set().union(*shares)
    assert len(covered) == 3 * (total // 3) and covered <= set(range(total))


def test_validation_is_fixed(tmp_path):
    first = build_data(config(tmp_path), batch_size=2, log=lambda *_: None).validation
    second = build_data(config(tmp_path), batch_size=2, seed=99, log=lambda *_: None).validation
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(first, second))


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    root = make_corpus(tmp_path / "corpus")
    (root / "broken.txt").write_bytes(b"valid text \xff\xfe more text\n")
    corpus = load_corpus(config(tmp_path, path=str(root)))
    assert corpus.replaced_bytes == 2


def _big_tokenizer(path):
    """A word-level tokenizer with 300 entries: too many for uint8 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(299)}
    vocab["<|endoftext|>"] = 299
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return True


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(config(tmp_path, path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no documents found"):
        load_corpus(config(tmp_path, path=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="no documents found|does not exist"):
        load_corpus(config(tmp_path, path=str(tmp_path / "corpus" / "*.nothing")))
    with pytest.raises(DataError, match="fewer than one window"):
        build_data(config(tmp_path, seqlen=100_000), batch_size=1, log=lambda *_: None)
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="does not parse"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(DataError, match="does not fit"):
        token_dtype(70_000, "uint16")
    with pytest.raises(DataError, match="does not fit"):
        build_data(config(tmp_path, tokenizer_file=str(tmp_path / "big.json"), token_dtype="uint8"),
                   batch_size=1, log=lambda *_: None) if _big_tokenizer(tmp_path / "big.json") else None
    with pytest.raises(ValueError, match="data.path is required"):
        DataConfig(source="files")


def test_a_tokenizer_directory_means_its_tokenizer_json(tmp_path):
    from trainer.data import load_tokenizer
    from trainer.data.sources import DataError
    with pytest.raises(DataError, match="is a directory with no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_sample_span_draws_aligned_runs_of_consecutive_windows(tmp_path):
    data = build_data(config(tmp_path, sample_span=2), batch_size=4, log=lambda *_: None)
    tokens = data.splits["train"].tokens
    seen = []
    for _ in range(data.train.batches_per_epoch):
        batch = next(data.train)
        starts = [int(np.flatnonzero(np.lib.stride_tricks.sliding_window_view(tokens, 16).__eq__(
            row.numpy()).all(axis=1))[0]) for row in batch.input_ids]
        # rows come in pairs: an even window followed by the next one
        assert all(s % 32 == 0 and t == s + 16 for s, t in zip(starts[::2], starts[1::2]))
        seen.extend(starts)
    assert len(set(seen)) == len(seen)
    with pytest.raises(DataError, match="sample_span=3 must be >= 1 and divide"):
        build_data(config(tmp_path, sample_span=3), batch_size=4, log=lambda *_: None)


def test_training_documents_are_packed_shuffled_and_held_out_ones_in_order(tmp_path):
    cfg = config(tmp_path)
    data = build_data(cfg, batch_size=2, log=lambda *_: None)
    corpus = load_corpus(cfg)

    def texts(split):
        tokens, offsets = data.splits[split].tokens, data.splits[split].offsets
        return [data.tokenizer.decode(tokens[a:b - 1].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]

    original = [row["text"] for row in corpus.splits["train"]]
    packed = texts("train")
    assert sorted(packed) == sorted(original) and packed != original
    assert texts("validation") == [row["text"] for row in corpus.splits["validation"]]
    # the order is part of the cache key: both orders can live in one cache
    in_order = build_data(config(tmp_path, shuffle_documents=False), batch_size=2, log=lambda *_: None)
    assert len(in_order.splits["train"].tokens) == len(data.splits["train"].tokens)
    assert not np.array_equal(in_order.splits["train"].tokens, data.splits["train"].tokens)


def test_tokenizing_leaves_no_intermediate_files(tmp_path, monkeypatch):
    """The Linux layout (train/validation parquet) is read into memory, and datasets' map results
    go to a scratch directory that is removed: only the shards stay."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    root = tmp_path / "linux"
    root.mkdir()
    texts = [p.read_text() for p in sorted(make_corpus(tmp_path / "docs").iterdir())]
    for split, part in (("train", texts[:32]), ("validation", texts[32:])):
        pq.write_table(pa.table({"path": [f"f{i}.c" for i in range(len(part))], "text": part}),
                       root / f"{split}.parquet")
    data = build_data(DataConfig(source="linux", path=str(root), vocab_size=300, seqlen=16,
                                 cache_dir=str(tmp_path / "cache"), num_proc=2), batch_size=2,
                      log=lambda *_: None)
    assert data.splits["train"].num_documents == 32
    arrow = [p for p in tmp_path.rglob("*.arrow")]
    assert arrow == [], arrow
    shards = tmp_path / "cache" / "shards"
    assert [p.name for p in shards.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("error, words", [
    (ConnectionError("Couldn't reach 'openwebtext' on the Hub (ConnectionError)"), "cannot be reached"),
    (type("DatasetNotFoundError", (Exception,), {})("Dataset 'nope' doesn't exist on the Hub"), "not found"),
])
def test_an_unreachable_hub_names_the_problem_and_the_local_alternative(tmp_path, monkeypatch, error, words):
    import datasets

    def unreachable(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match=words) as raised:
        build_data(DataConfig(source="hub", hub_name="openwebtext", cache_dir=str(tmp_path)), batch_size=2,
                   log=lambda *_: None)
    assert "data=linux" in str(raised.value) and "data=files" in str(raised.value)


def test_an_edit_that_keeps_size_and_mtime_rebuilds_the_token_cache(tmp_path):
    import os
    cfg = config(tmp_path)
    before = build_data(cfg, batch_size=2, log=lambda *_: None)
    path = Path(cfg.path) / "doc000.txt"
    stat = path.stat()
    text = path.read_text()
    path.write_text(text.replace("alpha", "gamma", 1) if "alpha" in text else text.replace("beta", "delta", 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))     # what cp -p and rsync -t do
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    messages = []
    after = build_data(cfg, batch_size=2, log=messages.append)
    assert any("tokenized" in m for m in messages), "the stale cache was reused"
    assert not np.array_equal(np.asarray(before.splits["train"].tokens), np.asarray(after.splits["train"].tokens)) \
        or not np.array_equal(np.asarray(before.splits["validation"].tokens),
                              np.asarray(after.splits["validation"].tokens))


def test_record_and_text_files_are_told_apart(tmp_path):
    import json
    notes = make_corpus(tmp_path / "notes")
    (notes / "results.json").write_text(json.dumps({"records": [{"a": 1}]}))
    (notes / "readme.md").write_text("# notes\n" + "alpha beta gamma " * 20)
    data = build_data(config(tmp_path, path=str(notes)), batch_size=2, log=lambda *_: None)
    total = data.splits["train"].num_documents + data.splits["validation"].num_documents
    assert total == 40 + 2                      # a .json next to text files is text too
    (notes / "more.jsonl").write_text('{"text": "a record"}\n')
    with pytest.raises(DataError, match=r"holds record files \(more.jsonl\) and text files"):
        build_data(config(tmp_path, path=str(notes)), batch_size=2, log=lambda *_: None)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jsonl").write_text('{"text": "fine"}\n{"text": unquoted}\n')
    with pytest.raises(DataError, match=r"cannot read the json records of a.jsonl"):
        build_data(config(tmp_path, path=str(broken)), batch_size=2, log=lambda *_: None)


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
