"""Training windows at two context lengths, interleaved at equal tokens per micro-batch.

A model continued at a long context (4K) from a short one (1K) learns to use the longer context but
loses short-range skill: with the same tokens per step a 4K batch holds a quarter of the 1K batch's
independent stretches of the corpus (docs/results/reproduction_h100.md). Mixing in micro-batches at
the short context, each holding ``seqlen / short_seqlen`` times the sequences, keeps part of every
step as diverse as short-context training while the rest teaches the long context.

Micro-batch k (counted from the start of training) is a short one when ``floor((k + 1) * f)`` exceeds
``floor(k * f)`` for the fraction f: an even interleave (f = 1/2: long, short, long, short, ...)
fixed by k alone, so resuming needs only the count and the two samplers' positions.

After ``pack_into_long_rows()`` a short micro-batch runs as rows of the long length, ``seqlen /
short_seqlen`` windows laid end to end in each row. That needs attention to stop at window edges (document-aware
batches: their ``cu_seqlens`` cut at every window) and a model whose attention scores depend only
on relative positions (rotary); the computation is then the same, and a compiled model serves every
micro-batch with one graph instead of compiling a second shape (24 s of a cold 4K stage on an H200).
"""

from fractions import Fraction

from .samplers import Batch, CausalWindows
from .shards import TokenSplit
from .sources import DataError


class MixedContextWindows:
    """``CausalWindows`` at ``seqlen`` (``batch_size`` rows) and at ``short_seqlen`` (``batch_size *
    seqlen / short_seqlen`` rows), a ``short_fraction`` of the micro-batches the short ones."""

    def __init__(self, split: TokenSplit, seqlen: int, batch_size: int, short_seqlen: int,
                 short_fraction: float, seed: int = 0, rank: int = 0, world_size: int = 1,
                 document_aware: bool = False, span: int = 1):
        if not 0 < short_seqlen < seqlen or seqlen % short_seqlen:
            raise DataError(f"data.mix_seqlen={short_seqlen} must be shorter than data.seqlen={seqlen} "
                            "and divide it (equal tokens in every micro-batch)")
        if not 0.0 < short_fraction < 1.0:
            raise DataError(f"data.mix_fraction must be in (0, 1); got {short_fraction}")
        self.seqlen = seqlen
        self.pack_short = False          # see pack_into_long_rows
        self.fraction = Fraction(short_fraction).limit_denominator(1000)
        self.long = CausalWindows(split, seqlen, batch_size, seed, rank, world_size, document_aware,
                                  span=span)
        self.short = CausalWindows(split, short_seqlen, batch_size * (seqlen // short_seqlen), seed,
                                   rank, world_size, document_aware, name="train (mixed-in short windows)",
                                   span=span)
        self.count = 0                   # micro-batches drawn so far

    def pack_into_long_rows(self):
        """From now on, run each short micro-batch as rows of the long length (module docstring).
        The caller vouches for the model: its attention scores must depend only on relative
        positions."""
        if not self.short.document_aware:
            raise DataError("packing short windows into long rows needs data.document_aware=true "
                            "(attention must stop at each window's edge)")
        self.pack_short = True

    def is_short(self, index: int) -> bool:
        """Whether micro-batch ``index`` is drawn at the short context."""
        return (index + 1) * self.fraction // 1 > index * self.fraction // 1

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        short = self.is_short(self.count)
        self.count += 1
        if not short:
            return next(self.long)
        batch = next(self.short)
        if not self.pack_short:
            return batch
        # Row-major, so the flattened tokens and their cu_seqlens (a cut at every window's end) are
        # unchanged. max_seqlen is the long rows' bound too: one value for every micro-batch, or a
        # compiled model would specialize on each.
        return Batch(batch.input_ids.reshape(-1, self.seqlen), batch.targets.reshape(-1, self.seqlen),
                     None, batch.cu_seqlens, self.seqlen)

    def state_dict(self):
        return {"count": self.count, "long": self.long.state_dict(), "short": self.short.state_dict(),
                "fraction": str(self.fraction), "short_seqlen": self.short.seqlen}

    def load_state_dict(self, state):
        if "long" not in state:
            raise ValueError("the sampler state was saved without data.mix_seqlen; resume with the "
                             "data settings it was saved with")
        saved = (state["short_seqlen"], Fraction(state["fraction"]))
        if saved != (self.short.seqlen, self.fraction):
            raise ValueError(f"the sampler state mixed windows of {saved[0]} tokens at a fraction of "
                             f"{saved[1]}; this run has {self.short.seqlen} and {self.fraction}")
        self.long.load_state_dict(state["long"])
        self.short.load_state_dict(state["short"])
        self.count = state["count"]
