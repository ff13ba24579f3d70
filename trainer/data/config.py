"""Settings of the data pipeline (filled from configs/data/*.yaml by Hydra)."""

import os
from dataclasses import dataclass, field

TEXT_EXTENSIONS = [".txt", ".md", ".rst", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go",
                   ".java", ".js", ".ts", ".sh", ".S", ".tex", ".html", ".css", ".json", ".yaml", ".toml"]


def default_cache_dir() -> str:
    return os.environ.get("FLASHTRAIN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "flashtrain"))


# Past ~16 processes tokenizing one corpus gains little: the Arrow files are written and merged
# serially, and each process holds its own copy of the tokenizer.
MAX_AUTO_PROCESSES = 16


def tokenizer_processes(num_proc: int | None) -> int:
    """data.num_proc, or for None the cores this process may run on (its CPU affinity, which a
    scheduler such as Slurm narrows), up to MAX_AUTO_PROCESSES."""
    if num_proc is not None:
        return num_proc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_PROCESSES))


@dataclass
class DataConfig:
    # Where documents come from: the running Python's standard library (built in, no download),
    # local files, the Linux-kernel parquet corpus, or a Hugging Face hub dataset.
    source: str = "python_stdlib"        # python_stdlib | files | linux | hub
    # files: a file, directory or glob (text files, .jsonl/.json, .parquet); linux: the corpus directory.
    path: str | None = None
    hub_name: str | None = None          # hub: dataset name, e.g. "openwebtext"
    hub_config: str | None = None        # hub: dataset configuration, if it has several
    # hub: a branch, tag or commit of the dataset's repository; "refs/convert/parquet" is the hub's
    # own parquet conversion, for a dataset published with a loading script (datasets >= 4 runs none)
    hub_revision: str | None = None
    text_field: str = "text"             # the column/field holding a document's text
    # files: the name endings read as text documents (.jsonl and .parquet files are read as
    # records, a document per record, whatever this says)
    extensions: list[str] = field(default_factory=lambda: list(TEXT_EXTENSIONS))
    validation_fraction: float = 0.05    # files/python_stdlib/hub-without-validation: share held out
    # Tokenizer: train a byte-level BPE ("bpe", GPT) or WordPiece ("wordpiece", BERT) on the training
    # split, or load an existing tokenizer.json (tokenizer_file).
    tokenizer: str = "bpe"               # bpe | wordpiece
    # A tokenizer.json to load instead of training one. None with model.init_from: the tokenizer.json
    # found with that model (the run stops if there is none).
    tokenizer_file: str | None = None
    vocab_size: int = 8192               # the trained tokenizer's vocabulary
    tokenizer_train_bytes: int = 50_000_000   # at most this much training text feeds the trainer
    seqlen: int = 256                    # tokens per training window (model context)
    document_aware: bool = False         # windows carry cu_seqlens: no attention across documents
    # Pack the training split's documents in a fixed random order instead of the corpus's own (a
    # directory order puts related files side by side, and batches then cover few of them).
    shuffle_documents: bool = True
    # Ablation: draw training windows in aligned runs of this many consecutive ones, so a batch
    # covers as few distinct stretches of the corpus as a run at sample_span x the context.
    sample_span: int = 1
    # Interleave training micro-batches at this shorter context (equal tokens: seqlen / mix_seqlen
    # times the rows), mix_fraction of them: a long-context stage that keeps the batch diversity of
    # short-context training for part of every step (trainer/data/mixed_context.py). Causal only.
    mix_seqlen: int | None = None
    mix_fraction: float = 0.5            # with mix_seqlen: the share of micro-batches at the shorter context
    # Run the short micro-batches as rows of data.seqlen (windows end to end, attention cut at each)
    # when that computes the same thing: document-aware batches and a rotary model. One compiled
    # shape instead of two.
    mix_pack: bool = True
    objective: str = "causal"            # causal (GPT windows) | mlm (BERT)
    mlm_probability: float = 0.15        # mlm: the share of tokens made targets (BERT: 0.15)
    # None: each token is a target with mlm_probability (Hugging Face's collator). A number K: as
    # the original BERT data (max_predictions_per_seq), exactly min(K, max(1, round(p·length)))
    # targets per sequence, so the model's MLM head runs on a fixed B x K positions: static shapes,
    # one compiled graph with no data-dependent selection.
    mlm_max_predictions: int | None = None
    # Pack several MLM sequences into each training row (best fit), each attended on its own
    # through cu_seqlens: the rows keep their static length with almost no padding (flash only).
    mlm_pack_sequences: bool = False
    val_windows: int = 64                # fixed validation windows, the same at every evaluation
    # Tokenization processes; None: one per core this process may run on, up to MAX_AUTO_PROCESSES.
    num_proc: int | None = None
    token_dtype: str | None = None       # uint16 | uint32 token ids on disk; None = smallest that fits
    # Tokenizers and token shards, reused by every run over the same corpus and settings
    cache_dir: str = field(default_factory=default_cache_dir)

    def __post_init__(self):
        # data.path and the tokenizer file are expanded where they are read; the cache is used
        # as a directory directly, where "~/x" would create a folder named "~".
        self.cache_dir = os.path.expanduser(self.cache_dir)
        # Checked here (not with Literal types) because Hydra's structured configs accept str only.
        for key, allowed in (("source", ("python_stdlib", "files", "linux", "hub")),
                             ("tokenizer", ("bpe", "wordpiece")), ("objective", ("causal", "mlm"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"data.{key}={getattr(self, key)!r}; expected one of {', '.join(allowed)}")
        if self.seqlen < 2:
            raise ValueError(f"data.seqlen must be >= 2; got {self.seqlen}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"data.validation_fraction must be in (0, 1); got {self.validation_fraction}")
        if self.source in ("files", "linux") and not self.path:
            raise ValueError(f"data.path is required with data.source={self.source}")
        if self.path and self.source not in ("files", "linux"):
            raise ValueError(f"data.path is set but data.source={self.source} does not read it; "
                             "choose data=files (text, jsonl or parquet files) or data=linux")
        if self.tokenizer == "bpe" and not self.tokenizer_file and self.vocab_size < 257:
            raise ValueError(f"data.vocab_size={self.vocab_size} is below a byte-level BPE's minimum "
                             "of 257 (256 byte tokens + <|endoftext|>)")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("data.hub_name is required with data.source=hub")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"data.mlm_probability must be in (0, 1); got {self.mlm_probability}")
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"data.num_proc must be >= 1 (or null: one per core); got {self.num_proc}")
        if self.mlm_max_predictions is not None and self.mlm_max_predictions < 1:
            raise ValueError(f"data.mlm_max_predictions must be >= 1 (or null); got {self.mlm_max_predictions}")
        if self.mix_seqlen is not None:
            if self.objective != "causal":
                raise ValueError("data.mix_seqlen mixes causal windows of two lengths; it needs "
                                 "data.objective=causal")
            if not 0 < self.mix_seqlen < self.seqlen or self.seqlen % self.mix_seqlen:
                raise ValueError(f"data.mix_seqlen={self.mix_seqlen} must be shorter than "
                                 f"data.seqlen={self.seqlen} and divide it (equal tokens per micro-batch)")
            if not 0.0 < self.mix_fraction < 1.0:
                raise ValueError(f"data.mix_fraction must be in (0, 1); got {self.mix_fraction}")
        if self.mlm_pack_sequences and self.objective != "mlm":
            raise ValueError("data.mlm_pack_sequences=true packs BERT sequences; it needs data.objective=mlm")
