"""Where a trained model lives, resolved the same way for every tool.

``scripts/sample.py``, ``scripts/convert_hf.py``, ``python -m trainer.evaluate`` and
``model.init_from`` all accept:

* a run directory: its newest intact checkpoint, or its final ``model.pt`` when that is at least
  as new (a run writes ``model.pt`` when it finishes);
* a checkpoint directory (``<run>/checkpoints/step_N``) or its ``state.pt``;
* a model file written by ``save_model`` (``model.pt``);
* a Hugging Face directory (``config.json``).

The tokenizer is looked for next to the model and then in the run directory, so no flag is needed
for anything a run wrote.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

from models import load_hf, load_model

from .checkpoint import SHARDED, STEP_NAME, CheckpointError, resumable_checkpoint


class ModelSourceError(ValueError):
    """A path that holds no model this project can load; the message says what was looked for."""


@dataclass
class ModelSource:
    path: Path                  # the file (or Hugging Face directory) to load
    kind: str                   # "model_file" | "checkpoint" | "huggingface"
    tokenizer: Path | None      # tokenizer.json found next to it, or None

    def load(self, **runtime):
        """The model, with runtime settings (attention, checkpoint_blocks) applied."""
        if self.kind == "huggingface":
            return load_hf(self.path, **runtime)
        if self.kind == "checkpoint" and (self.path.parent / SHARDED).is_dir():
            return _load_sharded_checkpoint(self.path, **runtime)
        return load_model(self.path, **runtime)


def _load_sharded_checkpoint(state_path: Path, **runtime):
    """An FSDP checkpoint: the weights live in torch.distributed.checkpoint shards, which one
    process can read whole (no process group needed)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from models import ModelConfig, build_model
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    model = build_model(ModelConfig(**{**state["model_config"], **runtime}), init=False)
    weights = {"model": model.state_dict()}
    with warnings.catch_warnings():      # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(weights, checkpoint_id=str(state_path.parent / SHARDED))
    model.load_state_dict(weights["model"])
    return model


def _run_directory_of(checkpoint_dir: Path) -> Path | None:
    if STEP_NAME.fullmatch(checkpoint_dir.name) and checkpoint_dir.parent.name == "checkpoints":
        return checkpoint_dir.parent.parent
    return None


def _tokenizer_near(*directories) -> Path | None:
    for directory in directories:
        if directory is not None and (directory / "tokenizer.json").is_file():
            return directory / "tokenizer.json"
    return None


def _from_run_directory(run_dir: Path) -> ModelSource:
    final = run_dir / "model.pt"
    try:
        checkpoint = resumable_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    except CheckpointError:
        if not final.is_file():
            raise
        checkpoint = None
    if checkpoint is not None and not (final.is_file()
                                       and final.stat().st_mtime >= (checkpoint / "state.pt").stat().st_mtime):
        return ModelSource(checkpoint / "state.pt", "checkpoint", _tokenizer_near(run_dir))
    if final.is_file():
        return ModelSource(final, "model_file", _tokenizer_near(run_dir))
    raise ModelSourceError(f"{run_dir}: a run directory without a checkpoint or model.pt yet")


def find_model(path) -> ModelSource:
    """Resolve ``path`` (see the module docstring) without loading anything."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelSourceError(f"{path} does not exist (give a run directory, a checkpoint directory, "
                               "a model file or a Hugging Face directory)")
    if path.is_file():
        if path.name == "state.pt":
            run_dir = _run_directory_of(path.parent)
            return ModelSource(path, "checkpoint", _tokenizer_near(path.parent, run_dir))
        return ModelSource(path, "model_file", _tokenizer_near(path.parent))
    if (path / "config.json").is_file():
        return ModelSource(path, "huggingface", _tokenizer_near(path))
    if (path / "state.pt").is_file():
        return ModelSource(path / "state.pt", "checkpoint", _tokenizer_near(path, _run_directory_of(path)))
    if (path / "model.pt").is_file() or (path / "checkpoints").is_dir():
        return _from_run_directory(path)
    raise ModelSourceError(f"{path}: no model here (looked for model.pt, checkpoints/, state.pt and a "
                           "Hugging Face config.json)")
