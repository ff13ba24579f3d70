"""Checkpoints that a killed save cannot destroy, and exact resume.

Layout: ``<run>/checkpoints/step_00000100/{state.pt, rng_rank0.pt, ...}`` and ``<run>/checkpoints/latest``
(a file naming the newest complete checkpoint). A save is assembled in ``.tmp-step_...``, flushed to
disk, renamed into place, and only then is ``latest`` replaced (itself via a temporary file): at every
instant ``latest`` names a complete checkpoint.
"""

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, missing, or from a different model."""


def _fsync_file(path: Path):
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _fsync_dir(path: Path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def rng_state() -> dict:
    numpy_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj, path: Path):
    torch.save(obj, path)
    _fsync_file(path)


def save_checkpoint(run_dir: Path, step: int, state: dict, context, keep: int) -> Path:
    """Collective: every rank contributes its RNG state; rank 0 writes the rest and publishes it."""
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:08d}"
    staging, final = root / f".tmp-{name}", root / name
    if context.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    context.barrier()
    _save(rng_state(), staging / f"rng_rank{context.rank}.pt")
    context.barrier()
    if context.is_main:
        _save(state, staging / "state.pt")
        _fsync_dir(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(name + "\n")
        _fsync_file(pointer)
        os.replace(pointer, root / "latest")
        _fsync_dir(root)
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    context.barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "state.pt").exists():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def load_checkpoint(path: Path, rank: int) -> tuple[dict, dict]:
    """(state, this rank's RNG state)."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        rng_path = path / f"rng_rank{rank}.pt"
        if not rng_path.exists():
            raise CheckpointError(f"{path} has no RNG state for rank {rank} (saved with fewer processes?)")
        rng = torch.load(rng_path, map_location="cpu", weights_only=False)
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(f"{path}: cannot read the checkpoint, corrupt or truncated "
                              f"({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"{path}/state.pt is not a flashtrain training checkpoint")
    return state, rng


def check_compatible(saved_model_config: dict, current_model_config: dict, path: Path):
    """Name every model setting that differs between the checkpoint and this run."""
    shape_keys = ("arch", "vocab_size", "max_seqlen", "d_model", "n_layer", "n_head", "n_kv_head", "d_ff",
                  "pad_vocab_multiple", "type_vocab_size")
    differences = [f"{key}: checkpoint {saved_model_config.get(key)!r}, this run {current_model_config.get(key)!r}"
                   for key in shape_keys if saved_model_config.get(key) != current_model_config.get(key)]
    if differences:
        raise CheckpointError(f"{path} holds a different model:\n  " + "\n  ".join(differences))
