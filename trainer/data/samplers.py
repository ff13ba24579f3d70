"""Samplers: deterministic, resumable, shardable batches from token shards.

``CausalWindows``: non-overlapping windows of seqlen + 1 tokens (inputs and targets shifted by one),
shuffled per epoch from a seed; optionally with ``cu_seqlens`` marking document boundaries so the
kernel's variable-length mode keeps attention inside documents.
``MaskedSequences``: BERT MLM sequences ([CLS] document chunk [SEP], padded), 15% of tokens selected,
80/10/10 mask/random/keep, labels -100 elsewhere; optionally packed several to a row (``packing.py``),
with ``cu_seqlens`` keeping each sequence's attention to itself.
Both expose ``state_dict()``/``load_state_dict()`` (epoch and position), and with ``rank``/``world_size``
each rank reads a disjoint share of every epoch.
"""

from dataclasses import dataclass

import numpy as np
import torch

from .packing import pack_sequences
from .shards import TokenSplit
from .sources import DataError

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor                  # (B, L) int64
    targets: torch.Tensor                    # (B, L) int64, IGNORE_INDEX where no loss
    attention_mask: torch.Tensor | None = None   # (B, L), 1 for real tokens (MLM padding)
    cu_seqlens: torch.Tensor | None = None   # int32 document offsets into the flattened B·L tokens
    max_seqlen: int | None = None

    def to(self, device):
        """The batch on ``device``. To a GPU the copy is asynchronous from page-locked memory, so
        the host does not wait for it (nor for the GPU work queued before it)."""
        pin = torch.device(device).type == "cuda"
        move = lambda t: None if t is None else (t.pin_memory() if pin else t).to(device, non_blocking=True)
        return Batch(move(self.input_ids), move(self.targets), move(self.attention_mask),
                     move(self.cu_seqlens), self.max_seqlen)

    @property
    def num_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


class _Shuffled:
    """Epoch-wise shuffled order over ``count`` items and this rank's exact position in it.

    Micro-batch k of rank r is slice ``(k * world_size + r) * batch_size`` of the epoch's
    permutation: at every step the ranks together read one contiguous stretch of it, so a run on
    N ranks sees the same samples per optimizer step as one rank accumulating N micro-batches.
    """

    def __init__(self, count, batch_size, seed, rank, world_size, what):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.count, self.batch_size, self.seed = count, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = count // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"{what}: {count} samples make no full batch of {batch_size} per rank "
                            f"({world_size} ranks); use less batch or more data")
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = None, None

    def order(self):
        if self._order_epoch != self.epoch:
            generator = np.random.default_rng([self.seed, self.epoch])
            self._order = generator.permutation(self.count)
            self._order_epoch = self.epoch
        return self._order

    def next_indices(self):
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = (self.position * self.world_size + self.rank) * self.batch_size
        self.position += 1
        return self.order()[start:start + self.batch_size]

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank, "count": self.count}

    def load_state_dict(self, state):
        if "long" in state:
            raise ValueError("the sampler state was saved with data.mix_seqlen (windows of two "
                             "lengths); resume with the data settings it was saved with")
        if state["world_size"] != self.world_size or state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']} and world size "
                             f"{state['world_size']}; this run has {self.seed} and {self.world_size}")
        # Older checkpoints do not record the count; a different one means other samples (another
        # corpus, seqlen or packing), whose positions this state does not describe.
        if state.get("count", self.count) != self.count:
            raise ValueError(f"sampler state was saved over {state['count']} samples per epoch; this "
                             f"run has {self.count} (a different corpus, data.seqlen or "
                             "data.mlm_pack_sequences)")
        self.epoch, self.position = state["epoch"], state["position"]


class CausalWindows:
    def __init__(self, split: TokenSplit, seqlen: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, document_aware: bool = False, name: str = "train", span: int = 1):
        """``span`` > 1 draws windows in aligned runs of that many consecutive ones, so that a batch
        holds only batch_size / span distinct stretches of the corpus: as many as a run at span
        times the context (an ablation that separates context length from batch diversity)."""
        self.split, self.seqlen, self.document_aware = split, seqlen, document_aware
        count = (len(split.tokens) - 1) // seqlen
        if count < 1:
            raise DataError(f"the {name} split has {len(split.tokens)} tokens, fewer than one window of "
                            f"{seqlen + 1}; lower data.seqlen or add data")
        if span < 1 or batch_size % span:
            raise DataError(f"data.sample_span={span} must be >= 1 and divide the micro-batch size "
                            f"({batch_size})")
        self.num_windows, self.span = count, span
        self._order = _Shuffled(count // span, batch_size // span, seed, rank, world_size,
                                f"the {name} split")

    @property
    def epoch(self):
        return self._order.epoch

    @property
    def batches_per_epoch(self):
        return self._order.batches_per_epoch

    def window_batch(self, window_indices) -> Batch:
        length = self.seqlen
        rows = np.stack([np.asarray(self.split.tokens[i * length:i * length + length + 1], dtype=np.int64)
                         for i in window_indices])
        batch = Batch(torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy()))
        if self.document_aware:
            batch.cu_seqlens, batch.max_seqlen = self._document_bounds(window_indices)
        return batch

    def _document_bounds(self, window_indices):
        """cu_seqlens over the flattened batch: a boundary wherever a document starts in a window.

        max_seqlen is the window length, a bound that holds for every batch, rather than the
        batch's longest piece: a value that changed per batch would make torch.compile recompile
        the model (the kernels' grid only gains programs that exit at once)."""
        length, offsets = self.seqlen, self.split.offsets
        bounds = [0]
        for row, index in enumerate(window_indices):
            start = index * length
            inside = offsets[(offsets > start) & (offsets < start + length)] - start
            cuts = np.concatenate([[0], inside, [length]])
            bounds.extend((row * length + cuts[1:]).tolist())
        return torch.tensor(bounds, dtype=torch.int32), length

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        runs = self._order.next_indices()
        return self.window_batch((runs[:, None] * self.span + np.arange(self.span)).reshape(-1))

    def state_dict(self):
        return self._order.state_dict()

    def load_state_dict(self, state):
        self._order.load_state_dict(state)


def validation_windows(split: TokenSplit, seqlen: int, count: int, batch_size: int,
                       document_aware: bool = False) -> list[Batch]:
    """A fixed set of evenly spaced windows: every evaluation sees exactly the same tokens."""
    windows = CausalWindows(split, seqlen, 1, document_aware=document_aware, name="validation")
    chosen = np.unique(np.linspace(0, windows.num_windows - 1, num=min(count, windows.num_windows)).astype(int))
    return [windows.window_batch(chosen[i:i + batch_size]) for i in range(0, len(chosen), batch_size)]


class MaskedSequences:
    """BERT MLM samples: each sequence is [CLS] + a chunk of one document + [SEP], padded.

    With ``pack``, a batch row holds several sequences (a fixed best-fit packing of all of them,
    rows shuffled per epoch) and the batch carries ``cu_seqlens``: each sequence, and each row's
    padding, one document of the flattened B·N tokens. A sequence is masked the same way packed or
    not (its generator depends on the seed, the epoch and the sequence alone)."""

    def __init__(self, split: TokenSplit, seqlen: int, batch_size: int, special: dict, vocab_size: int,
                 mlm_probability: float = 0.15, seed: int = 0, rank: int = 0, world_size: int = 1,
                 name: str = "train", max_predictions: int | None = None, pack: bool = False):
        missing = [k for k in ("cls", "sep", "pad", "mask") if special.get(k) is None]
        if missing:
            raise DataError(f"MLM needs a tokenizer with [CLS] [SEP] [PAD] [MASK]; missing {missing} "
                            "(use data.tokenizer=wordpiece)")
        self.split, self.seqlen, self.special = split, seqlen, special
        self.vocab_size, self.mlm_probability, self.seed = vocab_size, mlm_probability, seed
        self.max_predictions = max_predictions     # None: Bernoulli targets; K: a fixed count <= K
        body = seqlen - 2
        starts, lengths = [], []
        for first, end in zip(split.offsets[:-1], split.offsets[1:]):
            end -= 1                                    # drop the separator appended to every document
            for chunk in range(int(first), int(end), body):
                starts.append(chunk)
                lengths.append(min(body, int(end) - chunk))
        if not starts:
            raise DataError(f"the {name} split has no tokens for MLM sequences")
        self.starts, self.lengths = np.asarray(starts), np.asarray(lengths)
        self.rows = None                 # packed: each row's sequence indices
        self.cu_length = None            # see fix_segment_count
        if pack:
            # Row target budget: with a cap K the model's head holds K positions per row.
            counts = None if max_predictions is None else [self._target_count(n) for n in lengths]
            self.rows = pack_sequences(self.lengths + 2, seqlen, counts, max_predictions)
        count = len(starts) if self.rows is None else len(self.rows)
        self._order = _Shuffled(count, batch_size, seed, rank, world_size, f"the {name} split")

    def fix_segment_count(self):
        """Give every packed batch's ``cu_seqlens`` one length, the most that any batch of these
        rows can need, filled with empty segments at the end (exact: they hold no token). A batch
        shape that never changes is what CUDA graphs capture once; the kernels' programs for the
        empty segments exit at once."""
        if self.rows is None:
            raise DataError("only packed MLM rows (data.mlm_pack_sequences=true) carry cu_seqlens")
        segments = [len(row) + int((self.lengths[row] + 2).sum() < self.seqlen) for row in self.rows]
        self.cu_length = sum(sorted(segments)[-self._order.batch_size:]) + 1

    @property
    def real_fraction(self) -> float:
        """The share of a batch's B·N positions that hold real tokens, over an epoch."""
        rows = len(self.starts) if self.rows is None else len(self.rows)
        return float((self.lengths + 2).sum() / (rows * self.seqlen))

    def sequence_batch(self, indices, epoch) -> Batch:
        """One sequence per row, padded."""
        return self.row_batch([[index] for index in indices], epoch)

    def row_batch(self, rows, epoch) -> Batch:
        """Each row the given sequences back to back, then padding. A packing sampler's batches
        carry ``cu_seqlens``: every sequence and every row's padding its own document."""
        inputs = np.full((len(rows), self.seqlen), self.special["pad"], dtype=np.int64)
        targets = np.full_like(inputs, IGNORE_INDEX)
        mask = np.zeros_like(inputs)
        bounds = []
        for row, indices in enumerate(rows):
            offset = 0
            for index in indices:
                bounds.append(row * self.seqlen + offset)
                offset = self._write(inputs[row], targets[row], int(index), epoch, offset)
            mask[row, :offset] = 1
            if offset < self.seqlen:
                bounds.append(row * self.seqlen + offset)
        batch = Batch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(mask))
        if self.rows is not None:
            total = len(rows) * self.seqlen
            bounds.append(total)
            if self.cu_length is not None:
                bounds.extend([total] * (self.cu_length - len(bounds)))
            batch.cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
            batch.max_seqlen = self.seqlen
        return batch

    def _write(self, inputs, targets, index: int, epoch: int, offset: int) -> int:
        """Write sequence ``index`` ([CLS] chunk [SEP], masked) into one row at ``offset``; returns
        where it ends."""
        special = self.special
        start, length = self.starts[index], self.lengths[index]
        end = offset + length + 2
        inputs[offset] = special["cls"]
        inputs[offset + 1:end - 1] = self.split.tokens[start:start + length]
        inputs[end - 1] = special["sep"]
        # One generator per (seed, epoch, sequence): the same masking whatever the batch layout.
        generator = np.random.default_rng([self.seed, epoch, index])
        chosen = self._targets(generator, length) + 1 + offset
        targets[chosen] = inputs[chosen]
        action = generator.random(len(chosen))
        inputs[chosen[action < 0.8]] = special["mask"]
        randomized = chosen[(action >= 0.8) & (action < 0.9)]
        inputs[randomized] = generator.integers(0, self.vocab_size, len(randomized))
        return end

    def _target_count(self, length: int) -> int:
        return min(self.max_predictions, max(1, round(self.mlm_probability * length)), length)

    def _targets(self, generator, length: int) -> np.ndarray:
        """Positions (within the chunk) that carry a loss, in increasing order."""
        if self.max_predictions is None:
            return np.flatnonzero(generator.random(length) < self.mlm_probability)
        return np.sort(generator.choice(length, self._target_count(length), replace=False))

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        indices = self._order.next_indices()
        if self.rows is None:
            return self.sequence_batch(indices, self._order.epoch)
        return self.row_batch([self.rows[index] for index in indices], self._order.epoch)

    def state_dict(self):
        return self._order.state_dict()

    def load_state_dict(self, state):
        self._order.load_state_dict(state)
