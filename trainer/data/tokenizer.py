"""Tokenizers: train a byte-level BPE (GPT) or a WordPiece (BERT) on the training split, cached by
corpus fingerprint and settings, or load any ``tokenizer.json``."""

import hashlib
import os
import tempfile
import time
from pathlib import Path

from datasets.utils import are_progress_bars_disabled
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .config import DataConfig
from .sources import Corpus, DataError

EOS = "<|endoftext|>"
# What ends a document in tokenizers loaded from elsewhere, first match taken: GPT-2's and this
# project's, Llama 3's, Llama 2's and Mistral's (SentencePiece-style).
EOS_NAMES = (EOS, "<|end_of_text|>", "</s>")
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load_tokenizer(path) -> Tokenizer:
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise DataError(f"tokenizer file {path} is a directory with no tokenizer.json in it")
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises plain Exceptions on bad JSON
        raise DataError(f"tokenizer file {path} does not parse as a tokenizer.json: "
                        f"{str(error).splitlines()[0][:160]}") from None


def _training_texts(corpus: Corpus, budget_bytes: int):
    used = 0
    for batch in corpus.splits["train"].iter(batch_size=256):
        for text in batch["text"]:
            if used >= budget_bytes:
                return
            used += len(text)
            yield text


def _new_tokenizer(kind: str, vocab_size: int):
    # Its progress bar follows datasets' switch, as every bar of the data pipeline does (off in a
    # batch job's log, where it would print blank lines).
    shown = not are_progress_bars_disabled()
    if kind == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        # Every byte is in the initial alphabet: no text is ever unknown.
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=shown,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS,
                                            show_progress=shown)
    return tokenizer, trainer


def get_tokenizer(config: DataConfig, corpus: Corpus, log=print) -> tuple[Tokenizer, str]:
    """The tokenizer and its fingerprint (which the token-shard cache keys on)."""
    if config.tokenizer_file:
        tokenizer = load_tokenizer(config.tokenizer_file)
        digest = hashlib.sha1(tokenizer.to_str().encode()).hexdigest()[:16]
        return tokenizer, digest
    key = hashlib.sha1(f"{corpus.fingerprint}|{config.tokenizer}|{config.vocab_size}|"
                       f"{config.tokenizer_train_bytes}".encode()).hexdigest()[:16]
    path = Path(config.cache_dir) / "tokenizers" / f"{config.tokenizer}-{config.vocab_size}-{key}.json"
    if path.exists():
        return load_tokenizer(path), key
    started = time.monotonic()
    log(f"data: training a {config.tokenizer} tokenizer of {config.vocab_size:,} tokens on up to "
        f"{config.tokenizer_train_bytes / 1e6:,.0f} MB of the training text into {path} (once; later "
        "runs reuse it)")
    tokenizer, trainer = _new_tokenizer(config.tokenizer, config.vocab_size)
    tokenizer.train_from_iterator(_training_texts(corpus, config.tokenizer_train_bytes), trainer=trainer)
    log(f"data: trained the tokenizer in {time.monotonic() - started:.1f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tokenizer.", dir=path.parent)
    os.close(handle)
    tokenizer.save(temporary)
    os.replace(temporary, path)
    return tokenizer, key


def end_of_text_id(tokenizer: Tokenizer) -> int | None:
    """The id of the first of ``EOS_NAMES`` the tokenizer has, or None."""
    ids = (tokenizer.token_to_id(name) for name in EOS_NAMES)
    return next((i for i in ids if i is not None), None)


def special_ids(tokenizer: Tokenizer) -> dict:
    """Ids of the special tokens the samplers need (None where the tokenizer has none)."""
    names = {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
    ids = {key: tokenizer.token_to_id(token) for key, token in names.items()}
    end = end_of_text_id(tokenizer)
    ids["eos"] = ids["sep"] if end is None else end      # BERT's WordPiece ends documents with [SEP]
    return ids


def write_tokenizer(tokenizer, path: Path):
    """Atomically: a run killed mid-write leaves the previous file or none, never half of one."""
    staging = path.with_name(f".{path.name}.tmp")
    tokenizer.save(str(staging))
    os.replace(staging, path)
