"""Typed run configuration. Hydra fills these dataclasses from configs/*.yaml; unknown keys and
wrong types are rejected by Hydra, impossible combinations by ``RunConfig.__post_init__``.

(Fields that take one of a few strings are ``str`` checked here: Hydra's structured configs do not
accept ``typing.Literal``.)
"""

import dataclasses
import difflib
import re
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from .data.config import DataConfig

# torch.compile modes that capture CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _one_of(key: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}; expected one of {', '.join(allowed)}")


@dataclass
class ModelSection:
    name: str = "gpt2_tiny"              # a size from models.size_names(): gpt2_small, bert_large, ...
    attention: str = "auto"              # auto (flash on CUDA, sdpa elsewhere) | flash | sdpa | eager
    dropout: float | None = None         # residual/embedding dropout; None keeps the size's default
    attn_dropout: float | None = None    # attention-probability dropout; None keeps the default
    checkpoint_blocks: bool = False      # activation checkpointing per block
    unpad: bool = True                   # bert + flash: pack real tokens (true) or keep the padded
                                         # layout, padding as separate documents (false: static shapes)
    pad_vocab_multiple: int = 64         # pad the embedding table for faster matmuls
    d_model: int | None = None           # optional overrides of the named size
    attn_window: int | None = None       # sliding-window attention (decoders): tokens a query sees
    global_every: int | None = None      # with attn_window: every k-th layer attends globally
    n_layer: int | None = None           # blocks (override of the named size)
    n_head: int | None = None            # attention heads (override of the named size)
    init_from: str | None = None         # start from a Hugging Face directory or a flashtrain model file
    # How init_from's positions grow when data.seqlen exceeds them. Learned tables: copy (tile,
    # as the FlashAttention paper did) | interpolate (stretch). Rotary models: ntk (raise the
    # rotary base; short range kept) | interpolate or copy (position interpolation).
    extend_method: str = "copy"

    def __post_init__(self):
        _one_of("model.attention", self.attention, ("auto", "flash", "sdpa", "eager"))
        _one_of("model.extend_method", self.extend_method, ("copy", "interpolate", "ntk"))


@dataclass
class OptimConfig:
    lr: float = 6e-4                     # peak learning rate
    min_lr_ratio: float = 0.1            # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1            # applied to 2-D weights only (matmuls, embeddings), not biases or norms
    beta1: float = 0.9                   # AdamW's first-moment decay
    beta2: float = 0.95                  # AdamW's second-moment decay
    eps: float = 1e-8                    # AdamW's denominator term
    warmup_steps: int = 100              # linear warmup from 0 to lr over these steps
    # After warmup: cosine | linear (decay to min_lr over the rest of the run) | constant | wsd
    # (warmup-stable-decay: the peak lr until the last decay_fraction of the steps, then linear to
    # min_lr; a resume may raise trainer.max_steps during the stable phase without changing the
    # lr already used)
    schedule: str = "cosine"
    decay_fraction: float = 0.2          # wsd: the share of max_steps spent decaying
    grad_clip: float = 1.0               # max global gradient norm; 0 disables clipping

    def __post_init__(self):
        _one_of("optim.schedule", self.schedule, ("cosine", "linear", "constant", "wsd"))
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction={self.decay_fraction}; expected a share of the "
                             "steps in (0, 1]")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip={self.grad_clip}: a maximum gradient norm is >= 0 "
                             "(0 disables clipping)")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("optim: lr must be > 0, warmup_steps >= 0, min_lr_ratio in [0, 1]")


@dataclass
class TrainerConfig:
    max_steps: int = 300                 # optimizer steps
    micro_batch_size: int = 8            # sequences per forward pass on each process
    grad_accum: int = 1                  # micro-batches per optimizer step (global batch = micro x accum x world)
    log_interval: int = 10               # steps between train metric lines
    eval_interval: int = 100             # steps between evaluations (and one at the end)
    save_interval: int = 100             # steps between checkpoints (and one at the end)
    # Also save when this many minutes have passed since the last checkpoint (checked at log
    # steps): a run killed without warning (the OOM killer, a lost node) loses at most about that.
    save_minutes: float | None = None
    # Stop at the last log step from which one more log window would still end within this many
    # minutes of the start (data and compilation included), save, and exit with status 75: for
    # jobs killed at a time limit without a warning signal. resume=true continues the run.
    max_minutes: float | None = None
    # After each evaluation with a lower validation loss than any before in this run directory,
    # write the weights to <run>/best_model.pt (a model file, which every tool reads).
    save_best: bool = False
    keep_checkpoints: int = 2            # newest checkpoints kept
    seed: int = 1337                     # weights, data order and dropout masks follow from it
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    # auto (bf16 on a GPU or a CPU with native bf16, else fp32) | bf16 | fp16 | fp32 (bf16/fp16:
    # autocast; fp16 adds a grad scaler)
    precision: str = "auto"
    compile: bool = False                # torch.compile the model (and its loss)
    # torch.compile mode: default | max-autotune-no-cudagraphs | reduce-overhead | max-autotune.
    # The last two capture CUDA graphs: the flash ops then draw their dropout seeds on the device
    # (a new mask at every replay); refused with grad_accum > 1 (tests/trainer/test_gpu_trainer.py).
    compile_mode: str = "default"
    skip_nonfinite: bool = False         # skip (and count) steps whose loss is not finite instead of stopping
    sample_tokens: int = 64              # tokens generated from the final model (causal models), 0 = none
    peak_tflops: float | None = None     # for MFU; None = the card's dense bf16 rate when known
    # How several processes (torchrun) share a step: ddp replicates the model and averages the
    # gradients; fsdp shards parameters, gradients and optimizer state per block (FSDP2,
    # fully_shard; bf16 parameters with float32 gradient reduction under precision=bf16) and saves
    # sharded checkpoints with torch.distributed.checkpoint. Ignored by a single process.
    distributed: str = "ddp"
    # How the console shows training: bar (a progress bar carrying the last log window's loss and
    # tokens/s), lines (a line per log window, as train.log always has) or auto (a bar when stderr
    # is a terminal, lines in a batch job's log).
    progress: str = "auto"
    # [FIRST, LAST]: profile those optimizer steps (torch.profiler) into <run>/profile/: a trace for
    # Perfetto and a table of the operators and kernels by time. Choose steps past compilation.
    profile_steps: list[int] | None = None

    def __post_init__(self):
        _one_of("trainer.precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        _one_of("trainer.progress", self.progress, ("auto", "bar", "lines"))
        _one_of("trainer.distributed", self.distributed, ("ddp", "fsdp"))
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"trainer.device={self.device!r}; expected auto, cpu, cuda or cuda:N")
        _one_of("trainer.compile_mode", self.compile_mode,
                ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"))
        for key in ("max_steps", "micro_batch_size", "grad_accum", "log_interval", "eval_interval",
                    "save_interval", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.{key} must be >= 1; got {getattr(self, key)}")
        for key in ("save_minutes", "max_minutes"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"trainer.{key}={getattr(self, key)}; expected minutes > 0 (or null)")
        if self.profile_steps is not None and (len(self.profile_steps) != 2
                                               or not 1 <= self.profile_steps[0] <= self.profile_steps[1]):
            raise ValueError(f"trainer.profile_steps={self.profile_steps}; expected [FIRST,LAST], "
                             "optimizer steps with 1 <= FIRST <= LAST, e.g. trainer.profile_steps=[20,25]")


@dataclass
class LoggerConfig:
    kind: str = "wandb"                  # wandb | none (metrics.jsonl and the console are always written)
    project: str = "flashtrain"          # the wandb project
    mode: str = "offline"                # offline (sync later with `wandb sync`) | online; WANDB_MODE wins
    name: str | None = None              # the wandb run name; None: wandb chooses one

    def __post_init__(self):
        _one_of("logger.kind", self.kind, ("wandb", "none"))
        _one_of("logger.mode", self.mode, ("offline", "online", "disabled"))


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    resume: bool = False                 # continue from the run directory's latest checkpoint
    experiment: str = "quickstart"       # the experiment's name (set by configs/experiment/*.yaml)

    def __post_init__(self):
        bert = self.model.name.startswith("bert")
        if bert != (self.data.objective == "mlm"):
            raise ValueError(f"model.name={self.model.name} needs data.objective="
                             f"{'mlm' if bert else 'causal'} (got {self.data.objective})")
        if bert and self.data.tokenizer == "bpe" and not self.data.tokenizer_file:
            raise ValueError("BERT needs a WordPiece tokenizer: set data.tokenizer=wordpiece")
        if self.trainer.precision == "fp16" and self.trainer.device == "cpu":
            raise ValueError("trainer.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
        cuda_graphs = self.trainer.compile and self.trainer.compile_mode in CUDA_GRAPH_MODES
        if cuda_graphs and self.trainer.grad_accum > 1:
            # PyTorch's CUDA-graph trees hand the first micro-batch's gradients to .grad in graph
            # memory that the next micro-batch's replay overwrites (pytorch/pytorch#169545, #96693).
            raise ValueError(f"trainer.compile_mode={self.trainer.compile_mode} captures CUDA graphs, "
                             f"which lose gradients accumulated over micro-batches "
                             f"(trainer.grad_accum={self.trainer.grad_accum}); use grad_accum=1 with a "
                             "larger micro_batch_size, or compile_mode=default")
        if cuda_graphs and self.data.objective == "mlm" and self.data.mlm_max_predictions is None:
            raise ValueError(f"trainer.compile_mode={self.trainer.compile_mode} captures CUDA graphs, "
                             "which need one batch shape, but the MLM head's target count changes "
                             "from batch to batch; set data.mlm_max_predictions (e.g. 80 at "
                             "data.seqlen=512, as BERT did), or use compile_mode=default")
        if self.data.document_aware and self.model.attention not in ("auto", "flash"):
            raise ValueError("data.document_aware=true packs documents with cu_seqlens, which only "
                             "model.attention=flash (or auto on CUDA) supports")


def unknown_keys(node, schema=None, prefix: str = "") -> list[str]:
    """Keys of a composed config (a DictConfig or dict) that ``RunConfig`` does not define, each
    with the closest defined name: Hydra's ``+key=value`` adds keys that the schema would ignore."""
    schema = schema or RunConfig
    fields = {f.name: f.type for f in dataclasses.fields(schema)}
    problems = []
    for key in node.keys():
        name = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            problems.append(name + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
        elif dataclasses.is_dataclass(fields[key]) and hasattr(node[key], "keys"):
            problems += unknown_keys(node[key], fields[key], f"{name}.")
    return problems


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
