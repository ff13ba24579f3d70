"""The data pipeline: corpus -> tokenizer -> cached token shards -> samplers."""

from dataclasses import dataclass

from .config import DataConfig
from .mixed_context import MixedContextWindows
from .samplers import IGNORE_INDEX, Batch, CausalWindows, MaskedSequences, validation_windows
from .shards import TokenSplit, build_shards
from .sources import DataError, load_corpus
from .tokenizer import EOS_NAMES, get_tokenizer, load_tokenizer, special_ids


@dataclass
class Data:
    tokenizer: object
    vocab_size: int
    special: dict
    train: object               # CausalWindows, MixedContextWindows or MaskedSequences
    validation: list            # fixed list of Batch
    splits: dict                # split -> TokenSplit


def build_data(config: DataConfig, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
               val_batch_size: int | None = None, log=print) -> Data:
    corpus = load_corpus(config)
    tokenizer, tokenizer_key = get_tokenizer(config, corpus, log=log)
    special = special_ids(tokenizer)
    if special["eos"] is None:
        raise DataError(f"the tokenizer has none of {', '.join(EOS_NAMES)} or [SEP] to end documents with")
    splits = build_shards(config, corpus, tokenizer, tokenizer_key, special["eos"], log=log)
    vocab_size = tokenizer.get_vocab_size()
    val_batch_size = val_batch_size or batch_size
    if config.objective == "mlm":
        train = MaskedSequences(splits["train"], config.seqlen, batch_size, special, vocab_size,
                                config.mlm_probability, seed, rank, world_size,
                                max_predictions=config.mlm_max_predictions,
                                pack=config.mlm_pack_sequences)
        held_out = MaskedSequences(splits["validation"], config.seqlen, 1, special, vocab_size,
                                   config.mlm_probability, seed=1234, name="validation",
                                   max_predictions=config.mlm_max_predictions)
        count = min(config.val_windows, len(held_out.starts))
        indices = list(range(count))
        validation = [held_out.sequence_batch(indices[i:i + val_batch_size], 0)
                      for i in range(0, count, val_batch_size)]
    else:
        if config.mix_seqlen:
            train = MixedContextWindows(splits["train"], config.seqlen, batch_size, config.mix_seqlen,
                                        config.mix_fraction, seed, rank, world_size,
                                        config.document_aware, span=config.sample_span)
        else:
            train = CausalWindows(splits["train"], config.seqlen, batch_size, seed, rank, world_size,
                                  config.document_aware, span=config.sample_span)
        validation = validation_windows(splits["validation"], config.seqlen, config.val_windows,
                                        val_batch_size, config.document_aware)
    return Data(tokenizer, vocab_size, special, train, validation, splits)


__all__ = ["DataConfig", "Data", "build_data", "Batch", "CausalWindows", "MixedContextWindows",
           "MaskedSequences", "validation_windows", "TokenSplit", "DataError", "IGNORE_INDEX",
           "load_tokenizer"]
