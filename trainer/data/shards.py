"""Token shards: each split tokenized once into a flat memory-mapped array plus document offsets.

Layout of a cache entry ``<cache>/shards/<fingerprint>/``: ``<split>.bin`` (uint16 when the
vocabulary fits, else uint32), ``<split>.offsets.npy`` (int64, n_docs + 1) and ``meta.json``,
written last. The entry is assembled in a temporary directory and renamed into place, so an
interrupted run never leaves something that looks complete.
"""

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from datasets import Features, Sequence, Value, concatenate_datasets
from datasets.utils import are_progress_bars_disabled
from tqdm import tqdm

from ..console import duration_text
from .config import DataConfig, tokenizer_processes
from .sources import Corpus, DataError

FORMAT = "flashtrain-shards-v1"
# The training split's documents are packed in this fixed random order (data.shuffle_documents).
# Corpora stored in directory order put related files side by side; packed in that order, a batch
# covers a few neighbourhoods of the corpus, and the fewer the longer its windows: at 65K tokens per
# step, 4K windows of the Linux tree in path order trained to 2.5x the perplexity of 1K windows.
SHUFFLE_SEED = 1234
# Without a bar, a split of at least PROGRESS_MIN_DOCUMENTS documents is tokenized in parts with a
# line after each: first PROGRESS_FIRST_PART of it, then parts of about PROGRESS_EVERY_S (each part
# costs datasets a new process pool, a fraction of a second).
PROGRESS_MIN_DOCUMENTS = 1_000
PROGRESS_FIRST_PART = 0.02
PROGRESS_EVERY_S = 30.0


def packing_order(documents: int) -> np.ndarray:
    """The fixed random order the training split's documents are packed in: the permutation that
    datasets' ``shuffle(seed=SHUFFLE_SEED)`` drew (its default generator), which caches built
    before this function existed used."""
    return np.random.default_rng(SHUFFLE_SEED).permutation(documents)


def token_dtype(vocab_size: int, requested: str | None = None) -> np.dtype:
    needed = np.uint16 if vocab_size <= 2**16 else np.uint32
    if requested is not None:
        dtype = np.dtype(requested)
        if vocab_size > np.iinfo(dtype).max + 1:
            raise DataError(f"vocabulary of {vocab_size} tokens does not fit in {dtype} token ids")
        return dtype
    return np.dtype(needed)


@dataclass
class TokenSplit:
    tokens: np.ndarray      # flat memmap of token ids, documents separated by EOS
    offsets: np.ndarray     # offsets[i] = first token of document i; offsets[-1] = len(tokens)

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1


def shard_fingerprint(corpus: Corpus, tokenizer_key: str, eos_id: int, dtype: str | None = None,
                      shuffle_documents: bool = True) -> str:
    key = f"{FORMAT}|{corpus.fingerprint}|{tokenizer_key}|{eos_id}|{dtype}"
    if shuffle_documents:
        key += f"|shuffled-{SHUFFLE_SEED}"
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def _text_bytes(table) -> int:
    """UTF-8 bytes of a split's text, summed over Arrow batches: as Python strings, OpenWebText's
    8M documents would take tens of GB."""
    return sum(pc.sum(pc.binary_length(batch["text"])).as_py() or 0
               for batch in table.with_format("arrow").iter(batch_size=100_000))


def _tokenize(table, encode, features, split: str, num_proc: int, scratch: Path, log):
    """``encode`` mapped over ``table`` by datasets in ``num_proc`` processes. With the data bars
    hidden (a batch job's log), a large split goes in parts so that a line can say how far it got:
    a first small part measures the rate, and each later one is sized to take PROGRESS_EVERY_S."""
    in_parts = are_progress_bars_disabled() and len(table) >= PROGRESS_MIN_DOCUMENTS
    first_size = max(1, int(len(table) * PROGRESS_FIRST_PART))
    part_size = first_size if in_parts else len(table)
    started = time.monotonic()
    pieces, done, logged = [], 0, 0.0
    while done < len(table):
        part = table.select(range(done, min(done + part_size, len(table)))) if in_parts else table
        # datasets writes map results as Arrow files, by default next to the source in its own
        # cache, where they stay (hundreds of MB for the 23 MB Linux corpus); here they go to a scratch
        # directory that build_shards removes.
        pieces.append(part.map(encode, batched=True, batch_size=64, remove_columns=part.column_names,
                               features=features,
                               num_proc=num_proc if len(part) >= 4 * num_proc else None,
                               desc=f"tokenizing {split}",
                               cache_file_name=str(scratch / f"{split}-ids-{len(pieces)}.arrow")))
        done += len(part)
        elapsed = time.monotonic() - started
        if in_parts and done < len(table):
            if elapsed - logged >= PROGRESS_EVERY_S / 2:   # not after a first part that took no time
                left = elapsed * (len(table) - done) / done
                log(f"data: tokenizing {split}: {done:,} of {len(table):,} documents "
                    f"({done / len(table):.0%}) in {duration_text(elapsed)}, about {duration_text(left)} left")
                logged = elapsed
            part_size = max(first_size, int(done / max(elapsed, 1e-3) * PROGRESS_EVERY_S))
    return pieces[0] if len(pieces) == 1 else concatenate_datasets(pieces)


def _write_split(table, tokenizer, eos_id, dtype, directory: Path, split: str, num_proc: int,
                 scratch: Path, log=print, order: np.ndarray | None = None):
    """Tokenize ``table`` in its own order (sequential reads) and write its documents in ``order``
    (a permutation of its rows; None: as they are)."""
    def encode(batch):
        ids = [encoding.ids + [eos_id] for encoding in tokenizer.encode_batch(batch["text"])]
        return {"ids": ids, "length": [len(x) for x in ids]}

    # Token ids stored as the shard's own dtype, not the int64 Arrow would infer: a quarter of the
    # scratch space at uint16 (9B OpenWebText tokens: 18 GB instead of 72 GB)
    features = Features({"ids": Sequence(Value(np.dtype(dtype).name)), "length": Value("int64")})
    encoded = _tokenize(table, encode, features, split, num_proc, scratch, log)
    lengths = np.asarray(encoded["length"], dtype=np.int64)
    if order is not None:
        # The packing order is applied to the tokenized ids (a quarter of the text's bytes at
        # uint16), read through an indices mapping: shuffling the text before tokenizing had
        # datasets write a full copy of it (about 38 GB for OpenWebText).
        lengths = lengths[order]
        encoded = encoded.select(order)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    path = directory / f"{split}.npy"
    tokens = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(int(offsets[-1]),))
    # The memmap's file is sparse: on a full disk, writing into it would die of SIGBUS with no
    # message. Reserving its blocks first turns that into an ENOSPC error here.
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as file:
            os.posix_fallocate(file.fileno(), 0, os.path.getsize(path))
    # Documents are written in turn, so each batch's ids, flattened by Arrow, are one contiguous run
    # of the array (13x faster than a Python loop per document: 0.2 s against 2.7 s for 41M tokens).
    position = 0
    for batch in tqdm(encoded.with_format("arrow").iter(batch_size=1024), total=-(-len(encoded) // 1024),
                      desc=f"writing {split}", leave=False, disable=are_progress_bars_disabled()):
        flat = pc.list_flatten(batch["ids"]).to_numpy(zero_copy_only=False)
        tokens[position:position + len(flat)] = flat
        position += len(flat)
    tokens.flush()
    del tokens
    np.save(directory / f"{split}.offsets.npy", offsets)
    return int(offsets[-1]), len(lengths)


def build_shards(config: DataConfig, corpus: Corpus, tokenizer, tokenizer_key: str, eos_id: int,
                 log=print) -> dict[str, TokenSplit]:
    """Tokenize every split into the cache (or reuse it) and map the result."""
    fingerprint = shard_fingerprint(corpus, tokenizer_key, eos_id, config.token_dtype, config.shuffle_documents)
    final = Path(config.cache_dir) / "shards" / fingerprint
    if not (final / "meta.json").exists():
        started = time.time()
        documents = sum(len(table) for table in corpus.splits.values())
        processes = tokenizer_processes(config.num_proc)
        log(f"data: tokenizing {documents:,} documents in {processes} process(es) into {final} "
            "(once; later runs reuse it)")
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{fingerprint}.", dir=final.parent))
        scratch = Path(tempfile.mkdtemp(prefix=".scratch-", dir=final.parent))
        try:
            dtype = token_dtype(tokenizer.get_vocab_size(), config.token_dtype)
            summary = {}
            for split, table in corpus.splits.items():
                # validation and test keep their order: held-out windows and scored targets stay
                # the same tokens whether or not training shuffles
                order = packing_order(len(table)) if split == "train" and config.shuffle_documents else None
                summary[split] = _write_split(table, tokenizer, eos_id, dtype, staging, split,
                                              processes, scratch, log, order)
            meta = {"format": FORMAT, "dtype": str(dtype), "splits": {
                s: {"tokens": t, "documents": d} for s, (t, d) in summary.items()}}
            (staging / "meta.json").write_text(json.dumps(meta, indent=1))
            os.replace(staging, final)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            free = shutil.disk_usage(final.parent).free
            raise DataError(f"no space left on {final.parent} for the token cache ({free / 1e6:,.0f} MB "
                            "free); its partial files were removed. Free space or point data.cache_dir "
                            "(or FLASHTRAIN_CACHE) at a larger disk.") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        seconds = time.time() - started
        text_bytes = sum(_text_bytes(table) for table in corpus.splits.values())
        tokens = sum(t for t, _ in summary.values())
        documents = sum(d for _, d in summary.values())
        log(f"data: tokenized {documents:,} documents, {text_bytes / 1e6:.1f} MB of text -> {tokens:,} tokens "
            f"in {seconds:.1f} s ({text_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s)"
            + (f"; {corpus.replaced_bytes} undecodable bytes replaced" if corpus.replaced_bytes else ""))
    return load_shards(final)


def load_shards(directory: Path) -> dict[str, TokenSplit]:
    meta_path = Path(directory) / "meta.json"
    if not meta_path.exists():
        raise DataError(f"{directory}: not a complete token cache (no meta.json)")
    meta = json.loads(meta_path.read_text())
    splits = {}
    for split, info in meta["splits"].items():
        tokens = np.load(Path(directory) / f"{split}.npy", mmap_mode="r")
        offsets = np.load(Path(directory) / f"{split}.offsets.npy")
        if len(tokens) != info["tokens"] or len(offsets) != info["documents"] + 1:
            raise DataError(f"{directory}: {split} does not match meta.json (corrupt cache; delete it)")
        splits[split] = TokenSplit(tokens, offsets)
    return splits
