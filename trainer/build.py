"""Turn a RunConfig into the objects a run needs: seeds, device, model (new or loaded), batch layout."""

import dataclasses
import logging
import os
import random

import numpy as np
import torch

from models import build_model, extend_context
from models.attention import resolve as resolve_attention

from .config import CUDA_GRAPH_MODES, RunConfig
from .model_source import ModelSourceError, find_model


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name} but no CUDA device is visible")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def check_attention_runs(config: RunConfig, device: torch.device):
    """Refuse, before any data is built, a run whose attention cannot run on ``device``."""
    if config.model.attention == "flash" and device.type != "cuda" \
            and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"model.attention=flash runs the Triton kernels, which need a CUDA GPU "
                         f"(this run is on {device}); use model.attention=auto or sdpa here")
    attention = resolve_attention(config.model.attention, device)
    for key in ("document_aware", "mlm_pack_sequences"):
        if getattr(config.data, key) and attention != "flash":
            raise ValueError(f"data.{key}=true packs documents with cu_seqlens, which only the "
                             f"flash kernel supports; on {device} attention resolves to {attention}")


def model_overrides(config: RunConfig, vocab_size: int) -> dict:
    section = config.model
    overrides = {"vocab_size": vocab_size, "attention": section.attention,
                 "checkpoint_blocks": section.checkpoint_blocks, "unpad": section.unpad,
                 "pad_vocab_multiple": section.pad_vocab_multiple}
    for key in ("dropout", "attn_dropout", "d_model", "n_layer", "n_head", "attn_window", "global_every"):
        if getattr(section, key) is not None:
            overrides[key] = getattr(section, key)
    return overrides


def rope_extension(method: str) -> str:
    return "rotary base raised, NTK-aware" if method == "ntk" else "position interpolation"


def adopt_init_tokenizer(config: RunConfig) -> str | None:
    """With ``model.init_from`` and no ``data.tokenizer_file``: the tokenizer.json found with that
    model (a Hugging Face directory's own, or its run directory's), the only one whose ids its
    embedding knows, set as ``data.tokenizer_file`` and returned. Refused before any data work
    when there is none: a tokenizer trained for this run would give the embedding other ids."""
    if not config.model.init_from or config.data.tokenizer_file:
        return None
    try:
        found = find_model(config.model.init_from).tokenizer
    except ModelSourceError as error:
        raise ValueError(f"model.init_from={config.model.init_from}: {error}") from None
    if found is None:
        raise ValueError(f"model.init_from={config.model.init_from}: no tokenizer.json was found next "
                         "to the model or in its run directory, and a tokenizer trained for this run "
                         "would give its embedding other ids; pass the one it was trained with as "
                         "data.tokenizer_file")
    config.data.tokenizer_file = str(found)
    return config.data.tokenizer_file


def make_model(config: RunConfig, vocab_size: int, seed: int):
    """A fresh model of the named size (positions sized to the context), or one loaded from
    ``model.init_from`` with its context extended when the data's windows are longer."""
    section = config.model
    seqlen = config.data.seqlen
    if section.init_from:
        try:
            source = find_model(section.init_from)
        except ModelSourceError as error:
            raise ValueError(f"model.init_from={section.init_from}: {error}") from None
        logging.getLogger("flashtrain").info(f"model.init_from: {source.kind} {source.path}")
        model = source.load(attention=section.attention, checkpoint_blocks=section.checkpoint_blocks,
                            unpad=section.unpad)
        rows = model.config.vocab_size
        if rows < vocab_size:
            raise ValueError(f"model.init_from has vocabulary {rows}, data.tokenizer_file "
                             f"({config.data.tokenizer_file}) {vocab_size}: give the tokenizer the "
                             "model was trained with")
        if rows > vocab_size:    # an embedding padded past its tokenizer (as some Qwen2 models are)
            logging.getLogger("flashtrain").info(
                f"model.init_from: {rows} embedding rows for the tokenizer's {vocab_size} tokens; "
                f"the last {rows - vocab_size} are never input")
        if seqlen > model.config.max_seqlen:
            method = rope_extension(section.extend_method) if model.config.arch == "rope" else section.extend_method
            logging.getLogger("flashtrain").info(
                f"model.init_from: context extended {model.config.max_seqlen} -> {seqlen} positions ({method})")
            extend_context(model, seqlen, section.extend_method)
        return model
    overrides = model_overrides(config, vocab_size)
    overrides["max_seqlen"] = seqlen   # a new model's position table (or rope context) = the context
    return build_model(section.name, seed=seed, **overrides)


def fit_batches_to_run(data, model, config: RunConfig) -> list[str]:
    """Lay the training batches out for this model and compile mode, where a layout computes the
    same thing in fewer shapes; returns what changed, for the log.

    - Mixed-in short windows (data.mix_seqlen) run as rows of data.seqlen when attention is cut at
      every window (document-aware batches) and scores depend only on relative positions (rotary;
      learned GPT-2 positions are absolute): one compiled shape instead of two.
    - Under CUDA graphs, packed MLM rows carry cu_seqlens of one fixed length (empty segments at
      the end), so the step is captured once rather than once per number of sequences."""
    changes = []
    section = config.data
    if (section.mix_seqlen and section.mix_pack and section.document_aware
            and getattr(model.config, "arch", None) == "rope"):
        data.train.pack_into_long_rows()
        changes.append(f"data.mix_seqlen: short windows run {section.seqlen // section.mix_seqlen} to a "
                       f"row of {section.seqlen} tokens (one compiled shape)")
    trainer = config.trainer
    if (trainer.compile and trainer.compile_mode in CUDA_GRAPH_MODES and section.objective == "mlm"
            and section.mlm_pack_sequences):
        data.train.fix_segment_count()
        changes.append(f"data.mlm_pack_sequences: cu_seqlens fixed at {data.train.cu_length} entries "
                       "(CUDA graphs need one batch shape)")
    return changes


def model_config_dict(model) -> dict:
    return dataclasses.asdict(model.config)


def compile_model(module, model, mode: str):
    """``torch.compile`` the training forward. A masked LM selects its scored positions with
    ``nonzero``, whose output size depends on the data; dynamo splits the graph there unless told to
    capture such ops. Captured, compiled BERT-large with SDPA ran 13 % faster on an H100 (139k
    against 123k real tokens/s, docs/results/train_h100.md). Not with flash attention: captured, its
    step ran slower in both layouts, 97k against 123k unpadded (H100) and 96k padded
    (``model.unpad=false``) against 128k unpadded uncaptured (H200), so flash keeps its graph
    breaks. The setting holds during this model's calls only (dynamo reads it while tracing), so
    other compiled models in the process keep their own."""
    config = model.config
    flash = resolve_attention(config.attention, next(model.parameters()).device) == "flash"
    compiled = torch.compile(module, mode=mode)
    if config.arch != "bert" or flash:
        return compiled

    def forward(*args, **kwargs):
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            return compiled(*args, **kwargs)
    return forward
