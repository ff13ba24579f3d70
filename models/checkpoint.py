"""A flashtrain model file: config and weights in one ``torch.save`` payload, written atomically."""

import dataclasses
import os
import tempfile
from pathlib import Path

import torch

from .build import build_model
from .config import ModelConfig


def save_model(model, path, state_dict=None, metadata: dict | None = None) -> None:
    """``state_dict``: the weights to store when ``model.state_dict()`` would not hold them whole
    (a sharded model gathers them first); default the model's own. ``metadata``: plain values
    stored beside them (a best model's step and validation loss), which loading ignores."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**(metadata or {}), "format": "flashtrain-model-v1",
               "config": dataclasses.asdict(model.config),
               "model": model.state_dict() if state_dict is None else state_dict}
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def load_error_reason(error: Exception) -> str:
    """What a ``torch.load`` error says about the file: for a ``weights_only`` refusal, the
    unpickler's own reason (an unknown opcode, a code-carrying global), not torch's boilerplate."""
    text = str(error).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip()
    first = text.splitlines()[0][:160] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def load_model(path, **overrides):
    """Rebuild a model saved by ``save_model``, or the model of a training checkpoint's ``state.pt``
    (which stores the same weights under ``model`` and the config under ``model_config``)."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:   # truncated or foreign file: say which, not a pickle traceback
        raise ValueError(f"{path}: not a readable flashtrain model file, corrupt or of another kind "
                         f"({load_error_reason(error)})") from None
    # a training checkpoint's "config" is the whole run's; its model's is "model_config"
    saved_config = (payload.get("model_config") or payload.get("config")) if isinstance(payload, dict) else None
    if not isinstance(saved_config, dict) or "model" not in payload or "arch" not in saved_config:
        raise ValueError(f"{path}: not a flashtrain model file or training checkpoint (no model "
                         "config and weights)")
    config = ModelConfig(**{**saved_config, **overrides})
    model = build_model(config, init=False)
    model.load_state_dict(payload["model"])
    return model
