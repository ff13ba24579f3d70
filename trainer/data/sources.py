"""Document sources: every one ends as ``{split: datasets.Dataset}`` with a ``text`` column.

Besides the splits, each source returns a fingerprint (what identifies its content, cheaply) so
tokenizers and token shards can be cached, and a count of undecodable bytes replaced.
"""

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.parquet
from datasets.table import InMemoryTable

from .config import DataConfig


class DataError(ValueError):
    """Bad data input: a missing path, no documents, an empty split. The message names it."""


@dataclass
class Corpus:
    splits: dict                      # "train" / "validation" -> datasets.Dataset with "text"
    fingerprint: str
    replaced_bytes: int = 0
    description: str = ""


def _held_out(relative_path: str, fraction: float) -> bool:
    """A stable train/validation split by a hash of the path, not by order or randomness."""
    bucket = int(hashlib.sha1(relative_path.encode()).hexdigest()[:8], 16) % 10_000
    return bucket < fraction * 10_000


def _content_fingerprint(paths) -> str:
    """A hash of the files' names and bytes. Size and mtime alone miss an edit that keeps both
    (cp -p, rsync -t) and would leave a stale token cache. Reading the bytes cost 0.04 s for the
    22 MB Linux corpus and 0.6 s for a standard library of 13,353 files (162 MB), measured on the
    development machine's CPU with the files in the page cache (2.9 s from a cold cache); the
    corpus is read anyway to build its splits."""
    digest = hashlib.blake2b(digest_size=16)
    for path in paths:
        digest.update(f"{path}\0".encode())
        with open(path, "rb") as file:
            while chunk := file.read(1 << 22):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _text_files(paths: list[str], root: str, fraction: float, label: str) -> Corpus:
    texts = {"train": [], "validation": []}
    replaced = 0
    for path in paths:
        raw = Path(path).read_bytes()
        text = raw.decode("utf-8", errors="replace")
        if "\ufffd" in text:
            # Count only replacements the decoder made, not U+FFFD characters the file really holds.
            replaced += text.count("\ufffd") - raw.count("\ufffd".encode())
        if text.strip():
            split = "validation" if _held_out(os.path.relpath(path, root), fraction) else "train"
            texts[split].append(text)
    if not texts["train"] or not texts["validation"]:
        # Too few files for the hash split to fill both sides (a single file, say): split the
        # longest document instead, its last `fraction` held out, so a small corpus still trains
        # and still measures held-out loss.
        pool = texts["train"] + texts["validation"]
        if pool:
            longest = max(range(len(pool)), key=lambda i: len(pool[i]))
            text = pool.pop(longest)
            cut = max(1, int(len(text) * (1 - fraction)))
            texts = {"train": pool + [text[:cut]], "validation": [text[cut:]] if text[cut:] else []}
            label += f" (validation: the last {fraction:.0%} of the longest file)"
    splits = {name: datasets.Dataset.from_dict({"text": docs}) for name, docs in texts.items()}
    return Corpus(splits, _content_fingerprint(paths) + f"-{fraction}", replaced, label)


def python_stdlib(config: DataConfig) -> Corpus:
    """The .py files of the running interpreter's standard library: real, on every machine."""
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(p for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if "site-packages" not in p and os.path.isfile(p))
    if not paths:
        raise DataError(f"no .py files under the standard library at {root}")
    return _text_files(paths, root, config.validation_fraction, f"python stdlib at {root}")


RECORD_SUFFIXES = (".jsonl", ".parquet")


def _sample(paths, count=3) -> str:
    names = ", ".join(os.path.basename(p) for p in paths[:count])
    return names + (f" and {len(paths) - count} more" if len(paths) > count else "")


def _records_and_texts(paths, config: DataConfig) -> tuple[list, list]:
    """Split the files into record files (a document per record) and text files (one document
    each). A .json file is a record file only where every file is one; next to text files it is
    text (a results file in a folder of notes). A folder of both kinds is refused, not half read."""
    all_records = bool(paths) and all(p.endswith(RECORD_SUFFIXES + (".json",)) for p in paths)
    records = [p for p in paths if p.endswith(RECORD_SUFFIXES) or all_records and p.endswith(".json")]
    as_records = set(records)
    texts = [p for p in paths if p.endswith(tuple(config.extensions)) and p not in as_records]
    if records and texts:
        raise DataError(f"data.path {config.path!r} holds record files ({_sample(records)}) and text "
                        f"files ({_sample(texts)}); point it at one kind, e.g. a glob such as "
                        "'DIR/**/*.md' or 'DIR/*.jsonl'")
    if records and len({p.endswith(".parquet") for p in records}) > 1:
        raise DataError(f"data.path {config.path!r} mixes parquet and json record files "
                        f"({_sample(records)}); use one format")
    return records, texts


def local_files(config: DataConfig) -> Corpus:
    """A file, a directory (searched recursively) or a glob: text files are one document each;
    .jsonl/.json and .parquet files hold a document per record, in ``config.text_field`` (see
    ``_records_and_texts`` for which .json files count as records)."""
    pattern = os.path.expanduser(config.path)
    if any(ch in pattern for ch in "*?["):
        paths = sorted(glob.glob(pattern, recursive=True))
        root = os.path.dirname(pattern.split("*")[0]) or "."
    elif os.path.isdir(pattern):
        paths = sorted(str(p) for p in Path(pattern).rglob("*"))
        root = pattern
    elif os.path.isfile(pattern):
        paths, root = [pattern], os.path.dirname(pattern) or "."
    else:
        raise DataError(f"data.path {config.path!r} does not exist")
    paths = [p for p in paths if os.path.isfile(p)]
    records, texts = _records_and_texts(paths, config)
    if records:
        kind = "parquet" if records[0].endswith(".parquet") else "json"
        try:
            table = datasets.load_dataset(kind, data_files=records, split="train")
        except Exception as error:  # noqa: BLE001 - datasets wraps parser errors in several kinds
            cause = error.__cause__ or error
            raise DataError(f"data.path {config.path!r}: cannot read the {kind} records of "
                            f"{_sample(records)} ({type(cause).__name__}: "
                            f"{str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ''})") from None
        if config.text_field not in table.column_names:
            raise DataError(f"{records[0]}: no field {config.text_field!r} (fields: {table.column_names}); "
                            "set data.text_field")
        table = table.select_columns([config.text_field]).rename_column(config.text_field, "text") \
            if config.text_field != "text" else table.select_columns(["text"])
        table = table.filter(lambda row: bool(row["text"] and row["text"].strip()))
        if len(table) < 2:
            raise DataError(f"data.path {config.path!r}: fewer than 2 non-empty records")
        parts = table.train_test_split(test_size=config.validation_fraction, seed=0)
        return Corpus({"train": parts["train"], "validation": parts["test"]},
                      _content_fingerprint(records) + f"-{config.text_field}-{config.validation_fraction}",
                      0, f"{len(records)} record files under {config.path}")
    if not texts:
        raise DataError(f"data.path {config.path!r}: no documents found (no files ending in "
                        f"{', '.join(config.extensions[:6])}, ... or .jsonl/.json/.parquet)")
    corpus = _text_files(texts, root, config.validation_fraction, f"{len(texts)} files under {config.path}")
    if len(corpus.splits["train"]) == 0:
        raise DataError(f"data.path {config.path!r}: every document was empty or held out for validation")
    return corpus


def linux(config: DataConfig) -> Corpus:
    """The Linux-kernel corpus layout: train/validation(/test).parquet with ``path`` and ``text``."""
    root = Path(os.path.expanduser(config.path))
    files = {split: root / f"{split}.parquet" for split in ("train", "validation")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise DataError(f"data.path {config.path!r}: missing {', '.join(missing)}")
    # Read into memory (~100 MB of text) rather than through load_dataset, which would keep an
    # Arrow copy of the corpus in the datasets cache for good.
    splits = {split: datasets.Dataset(InMemoryTable(pyarrow.parquet.read_table(path, columns=["text"])))
              for split, path in files.items()}
    return Corpus(splits, _content_fingerprint([str(p) for p in files.values()]), 0, f"linux corpus at {root}")


def _hub_error(config: DataConfig, error: Exception) -> Exception:
    """A DataError for what a user can act on (no network, no such dataset); anything else as is."""
    kind = type(error).__name__
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else kind
    local = ("train on a local corpus instead: data=linux data.path=DIR (train/validation parquet) or "
             "data=files data.path='DIR/*.txt'")
    if "scripts are no longer supported" in first:
        return DataError(f"hub dataset {config.hub_name!r} is published with a loading script, which "
                         f"datasets {datasets.__version__} no longer runs (4.0 dropped them). Read the "
                         "hub's parquet conversion of it, where one exists "
                         "(data.hub_revision=refs/convert/parquet), a copy in parquet or JSON under "
                         f"another data.hub_name, or {local}")
    if kind in ("DatasetNotFoundError", "RepositoryNotFoundError", "FileNotFoundError") and \
            "offline" not in first.lower():
        return DataError(f"hub dataset {config.hub_name!r}: not found ({first}); check data.hub_name, "
                         f"or {local}")
    if isinstance(error, (ConnectionError, OSError, TimeoutError)) or "connect" in kind.lower() \
            or "offline" in first.lower() or "timeout" in kind.lower():
        return DataError(f"hub dataset {config.hub_name!r}: the Hugging Face hub cannot be reached "
                         f"({kind}: {first}). A dataset downloaded once is read from datasets' cache "
                         f"offline (set HF_DATASETS_OFFLINE=1 to skip the network); otherwise {local}")
    return error


def hub(config: DataConfig) -> Corpus:
    """A Hugging Face hub dataset by name (needs network the first time; then datasets' cache)."""
    try:
        loaded = datasets.load_dataset(config.hub_name, config.hub_config, revision=config.hub_revision)
    except Exception as error:  # noqa: BLE001 - datasets, huggingface_hub and the HTTP client raise many kinds
        raise _hub_error(config, error) from None
    train = loaded["train"]
    if config.text_field not in train.column_names:
        raise DataError(f"hub dataset {config.hub_name}: no field {config.text_field!r}; set data.text_field")
    if "validation" in loaded:
        splits = {"train": train, "validation": loaded["validation"]}
    else:
        parts = train.train_test_split(test_size=config.validation_fraction, seed=0)
        splits = {"train": parts["train"], "validation": parts["test"]}
    splits = {k: v.select_columns([config.text_field]).rename_column(config.text_field, "text")
              if config.text_field != "text" else v.select_columns(["text"]) for k, v in splits.items()}
    return Corpus(splits, f"hub-{config.hub_name}-{config.hub_config}-{train._fingerprint}", 0,
                  f"hub dataset {config.hub_name}")


SOURCES = {"python_stdlib": python_stdlib, "files": local_files, "linux": linux, "hub": hub}


def load_corpus(config: DataConfig) -> Corpus:
    corpus = SOURCES[config.source](config)
    for split, table in corpus.splits.items():
        if len(table) == 0:
            raise DataError(f"{corpus.description}: the {split} split has no documents")
    return corpus
