"""The data pipeline on tiny corpora made here: sources, tokenizers, shards, samplers, errors (the
masked-LM samples: test_mlm_data.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from trainer.data import DataConfig, DataError, build_data, load_tokenizer
from trainer.data import shards as shards_module
from trainer.data.samplers import CausalWindows
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
    # in the packing order, which is the permutation datasets' shuffle(seed=SHUFFLE_SEED) draws:
    # caches written when the text itself was shuffled that way hold the same tokens
    assert packed == [original[i] for i in shards_module.packing_order(len(original))]
    shuffled = corpus.splits["train"].shuffle(seed=shards_module.SHUFFLE_SEED)
    assert packed == [row["text"] for row in shuffled]
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


def test_a_hub_dataset_with_a_loading_script_is_explained_and_a_revision_can_be_chosen(tmp_path, monkeypatch):
    import datasets
    asked = []

    def scripted(*args, **kwargs):
        asked.append(kwargs.get("revision"))
        raise RuntimeError("Dataset scripts are no longer supported, but found openwebtext.py")

    monkeypatch.setattr(datasets, "load_dataset", scripted)
    for revision in (None, "refs/convert/parquet"):
        with pytest.raises(DataError, match="published with a loading script") as raised:
            build_data(DataConfig(source="hub", hub_name="openwebtext", hub_revision=revision,
                                  cache_dir=str(tmp_path)), batch_size=2, log=lambda *_: None)
    assert asked == [None, "refs/convert/parquet"]
    assert "data.hub_revision=refs/convert/parquet" in str(raised.value) and "data=files" in str(raised.value)


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


def test_tokenizer_processes_default_to_the_usable_cores_up_to_a_cap(monkeypatch):
    from trainer.data import config as config_module
    assert config_module.tokenizer_processes(3) == 3
    monkeypatch.setattr(config_module.os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert config_module.tokenizer_processes(None) == 6
    monkeypatch.setattr(config_module.os, "sched_getaffinity", lambda pid: set(range(128)), raising=False)
    assert config_module.tokenizer_processes(None) == config_module.MAX_AUTO_PROCESSES
    with pytest.raises(ValueError, match="data.num_proc must be >= 1"):
        DataConfig(num_proc=0)


def test_without_bars_a_large_split_is_tokenized_in_parts_with_progress_lines(tmp_path, monkeypatch):
    """A batch job's log gets a line as each part of a long tokenization finishes; the shards are
    the same tokens as one pass over the split."""
    from datasets.utils import disable_progress_bars, enable_progress_bars
    monkeypatch.setattr(shards_module, "PROGRESS_MIN_DOCUMENTS", 20)
    monkeypatch.setattr(shards_module, "PROGRESS_FIRST_PART", 1 / 3)
    monkeypatch.setattr(shards_module, "PROGRESS_EVERY_S", 0.0)
    in_one_pass = build_data(config(tmp_path, num_proc=2), batch_size=2, log=lambda *_: None)
    lines = []
    disable_progress_bars()
    try:
        in_parts = build_data(config(tmp_path, num_proc=2, cache_dir=str(tmp_path / "cache2")),
                              batch_size=2, log=lines.append)
    finally:
        enable_progress_bars()
    progress = [line for line in lines if line.startswith("data: tokenizing train:")]
    # 31 training documents in parts of 10, 10, 10 and 1 (the first a third of them, the rest as
    # large, none taking the 0 s set here): a line after each but the last; the 9 held-out
    # documents are too few to split
    assert in_one_pass.splits["train"].num_documents == 31
    assert [line.split(" documents")[0] for line in progress] == [
        f"data: tokenizing train: {done} of 31" for done in (10, 20, 30)], lines
    assert "(32%)" in progress[0] and "left" in progress[0]
    for split in ("train", "validation"):
        assert np.array_equal(in_parts.splits[split].tokens, in_one_pass.splits[split].tokens)
        assert np.array_equal(in_parts.splits[split].offsets, in_one_pass.splits[split].offsets)


def test_text_size_is_counted_in_utf8_bytes_without_python_strings(tmp_path):
    """The tokenizing summary's text size: UTF-8 bytes from Arrow batches, also through a split's
    indices mapping (a shuffled or held-out selection of a larger table)."""
    import datasets
    table = datasets.Dataset.from_dict({"text": ["héllo wörld", "ab", "", "日本語のテキスト"] * 50})
    selection = table.shuffle(seed=0).select(range(37))
    for split in (table, selection):
        assert shards_module._text_bytes(split) == sum(len(t.encode()) for t in split["text"])
