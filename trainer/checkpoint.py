"""Checkpoints that a killed save cannot destroy, and exact resume.

Layout: ``<run>/checkpoints/step_00000100/{state.pt, rng_rank0.pt, ..., manifest.json}`` and
``<run>/checkpoints/latest`` (a file naming the newest complete checkpoint). A save is assembled in
``.tmp-step_...``, flushed to disk, renamed into place, and only then is ``latest`` replaced (itself
via a temporary file): at every instant ``latest`` names a complete checkpoint.

Checkpoints are data, never code: every file is read with ``torch.load(weights_only=True)`` (tensors
and plain Python values only), so a crafted file cannot run anything. ``manifest.json`` holds each
file's SHA-256; a resume verifies it and falls back to the newest intact checkpoint when the newest
is damaged, saying which.
"""

import dataclasses
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import load_error_reason

from .config import RunConfig


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


STEP_NAME = re.compile(r"step_\d{8}")
SHARDED = "sharded"     # the torch.distributed.checkpoint directory of an FSDP checkpoint
MANIFEST = "manifest.json"
log = logging.getLogger("flashtrain")


def _save(obj, path: Path):
    torch.save(obj, path)
    _fsync_file(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(directory: Path):
    """SHA-256 of every file of the checkpoint, the sharded torch.distributed.checkpoint files
    included, by path relative to it."""
    files = {p.relative_to(directory).as_posix(): _sha256(p) for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"sha256": files}, indent=1))
    _fsync_file(directory / MANIFEST)


def verify_checkpoint(path: Path, rank: int = 0):
    """Raise CheckpointError unless state.pt and this rank's RNG file match the manifest. A checkpoint
    written before manifests existed passes with a warning."""
    manifest = path / MANIFEST
    if not manifest.exists():
        log.warning(f"{path} has no {MANIFEST} (an older checkpoint): its contents are not verified")
        return
    try:
        expected = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{manifest} is corrupt (not the JSON a save writes)") from None
    names = ["state.pt", f"rng_rank{rank}.pt"] + sorted(n for n in expected if n.startswith(SHARDED + "/"))
    for name in names:
        if not (path / name).exists():
            raise CheckpointError(f"{path} is incomplete: {name} is missing")
        if expected.get(name) != _sha256(path / name):
            raise CheckpointError(f"{path}/{name} is corrupt: its SHA-256 differs from the manifest's")


def _tensor_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def disk_full(error: BaseException, directory: Path, needed: int = 0) -> bool:
    """Whether a failed write is a full disk. torch.save does not say so: on a full filesystem it
    raises "basic_ios::clear: iostream error" or "file write failed", so the free space decides."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(directory).free <= max(needed, 1 << 20)
    except OSError:
        return False


def write_failure(error: BaseException, root: Path, step: int, needed: int = 0) -> BaseException:
    """The error to raise for a checkpoint that could not be written; its staging is already gone."""
    previous = (root / "latest").read_text().strip() if (root / "latest").exists() else None
    kept = f"{root / previous} is intact" if previous else "no earlier checkpoint exists"
    if disk_full(error, root, needed):
        return CheckpointError(f"no space left on {root} (the filesystem is full): the step-{step} "
                               f"checkpoint (~{needed / 1e6:,.0f} MB) was not written and its partial "
                               f"files were removed; {kept}. Free space, lower "
                               "trainer.keep_checkpoints, or run in a directory on a larger disk.")
    return CheckpointError(f"could not write the step-{step} checkpoint in {root} "
                           f"({type(error).__name__}: {str(error).strip()[:200]}); partial files removed; {kept}")


def sharded_state(model, optimizer) -> dict:
    """The FSDP model's and optimizer's state as DTensor shards, for torch.distributed.checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def load_sharded(path: Path, model, optimizer):
    """Collective: every process reads its shards of ``path``/sharded into the FSDP model and its
    optimizer. Resharding to another number of processes is what torch.distributed.checkpoint
    does on load; the run's other state (sampler positions) assumes the same number, so a resume
    refuses a different one (docs/distributed.md says how to continue on another count)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    state = sharded_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(path / SHARDED))
    except Exception as error:
        raise CheckpointError(f"{path / SHARDED}: cannot load the sharded model and optimizer "
                              f"({type(error).__name__}: {str(error).strip()[:200]})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def save_checkpoint(run_dir: Path, step: int, state: dict, context, keep: int, sharded: dict | None = None) -> Path:
    """Collective: every rank contributes its RNG state (and, under FSDP, its shards of ``sharded``
    through torch.distributed.checkpoint); rank 0 writes the rest and publishes it."""
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:08d}"
    staging, final = root / f".tmp-{name}", root / name
    if context.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    context.barrier()
    try:
        _save(rng_state(), staging / f"rng_rank{context.rank}.pt")
        if sharded is not None:
            import torch.distributed.checkpoint as dcp
            dcp.save(sharded, checkpoint_id=str(staging / SHARDED))
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise write_failure(error, root, step) from None
    context.barrier()
    if context.is_main:
        try:
            _save(state, staging / "state.pt")
            _write_manifest(staging)
            _fsync_dir(staging)
        except Exception as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise write_failure(error, root, step, _tensor_bytes(state)) from None
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


def step_directories(run_dir: Path) -> list[Path]:
    """Every complete-looking checkpoint directory of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir() and STEP_NAME.fullmatch(p.name)) \
        if root.is_dir() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names; None for a run without checkpoints. Refuses (rather than
    starting over and overwriting them) when step directories exist but ``latest`` does not."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        found = step_directories(run_dir)
        if found:
            names = ", ".join(p.name for p in found)
            raise CheckpointError(
                f"{pointer.parent} holds {names} but no 'latest' pointer, so nothing is resumed or "
                f"overwritten. To resume from {found[-1].name}: echo {found[-1].name} > {pointer} and "
                "pass resume=true; or choose a new hydra.run.dir")
        return None
    name = pointer.read_text().strip()
    if not name:
        raise CheckpointError(f"{pointer} is empty; write the name of a checkpoint directory into it "
                              f"(e.g. {found[-1].name})" if (found := step_directories(run_dir))
                              else f"{pointer} is empty and the run has no checkpoint directories")
    if not STEP_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} names {name!r}; it may only name a step_NNNNNNNN directory "
                              f"inside {pointer.parent}")
    path = pointer.parent / name
    if not (path / "state.pt").exists():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def resumable_checkpoint(run_dir: Path, rank: int = 0) -> Path | None:
    """The newest intact checkpoint, starting from ``latest``: a damaged one is skipped with a
    warning that names it and the one used instead; none intact is an error naming each."""
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return None
    candidates = [newest] + [p for p in reversed(step_directories(run_dir)) if p.name < newest.name]
    problems = []
    for path in candidates:
        try:
            verify_checkpoint(path, rank)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        if path != newest:
            log.warning(f"resuming from {path.name} instead of {newest.name}: " + "; ".join(problems))
        return path
    raise CheckpointError("no intact checkpoint to resume from:\n  " + "\n  ".join(problems))


def load_checkpoint(path: Path, rank: int) -> tuple[dict, dict]:
    """(state, this rank's RNG state)."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        rng_path = path / f"rng_rank{rank}.pt"
        if not rng_path.exists():
            raise CheckpointError(f"{path} has no RNG state for rank {rank} (saved with fewer processes?)")
        rng = torch.load(rng_path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: refused to load: the file holds more than tensors and plain "
                              f"values (a pickled object that would run code, or corruption): "
                              f"{load_error_reason(error)}") from None
    except Exception as error:
        raise CheckpointError(f"{path}: cannot read the checkpoint, corrupt or truncated "
                              f"({load_error_reason(error)})") from None
    if not isinstance(state, dict) or "step" not in state \
            or "model" not in state and not (path / SHARDED).is_dir():
        raise CheckpointError(f"{path}/state.pt is not a flashtrain training checkpoint")
    return state, rng


# Settings a resumed run may change: how long it runs, how it logs, evaluates, saves and compiles,
# and how attention is computed (the same function either way). Anything else (data, batch,
# optimizer, model shape, seed) would silently make the resumed run a different run.
RESUMABLE_CHANGES = ("resume", "trainer.max_steps", "trainer.log_interval", "trainer.eval_interval",
                     "trainer.save_interval", "trainer.save_minutes", "trainer.max_minutes",
                     "trainer.save_best",
                     "trainer.keep_checkpoints", "trainer.sample_tokens", "trainer.skip_nonfinite",
                     "trainer.compile", "trainer.compile_mode", "trainer.peak_tflops", "trainer.device",
                     "trainer.progress", "trainer.profile_steps", "model.attention",
                     "model.checkpoint_blocks", "model.unpad", "data.num_proc", "data.cache_dir", "logger.")


def flat_settings(tree: dict, prefix: str = "") -> dict:
    """A nested config as {"section.key": value}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def default_settings() -> dict:
    """Every run setting's default, flat: how a run behaved under a key its config predates."""
    return flat_settings(dataclasses.asdict(RunConfig()))


def config_changes(saved: dict, current: dict, path: Path) -> list[str]:
    """The allowed differences between a checkpoint's run config and this run's, as log lines;
    raises CheckpointError naming every difference that is not allowed."""
    old, new = flat_settings(saved), flat_settings(current)
    # A key added to the configuration after the checkpoint was written is absent from it: the
    # saved run behaved as the key's default does, so keeping the default is no change.
    defaults = default_settings()
    saved_value = lambda key: old[key] if key in old else defaults.get(key)
    changed = [key for key in sorted(set(old) | set(new)) if saved_value(key) != new.get(key)]
    allowed = lambda key: any(key == a or (a.endswith(".") and key.startswith(a)) for a in RESUMABLE_CHANGES)
    saved_text = lambda key: repr(old[key]) if key in old else "(not in the checkpoint)"
    describe = lambda key: f"{key}: {saved_text(key)} -> {new.get(key)!r}"
    refused = [describe(key) for key in changed if not allowed(key)]
    if refused:
        raise CheckpointError(f"{path} was saved by a run with other settings; a resume may change only "
                              "run length, logging, evaluation, saving, compilation and the attention "
                              "implementation. Differences:\n  " + "\n  ".join(refused))
    return [describe(key) for key in changed if key != "resume"]


def check_compatible(saved_model_config: dict, current_model_config: dict, path: Path):
    """Name every model setting that differs between the checkpoint and this run."""
    shape_keys = ("arch", "vocab_size", "max_seqlen", "d_model", "n_layer", "n_head", "n_kv_head", "d_ff",
                  "pad_vocab_multiple", "type_vocab_size", "tie_embeddings")
    # Keys added since the first checkpoints were written, with the value those checkpoints meant.
    saved = {"tie_embeddings": True, **saved_model_config}
    differences = [f"{key}: checkpoint {saved.get(key)!r}, this run {current_model_config.get(key)!r}"
                   for key in shape_keys if saved.get(key) != current_model_config.get(key)]
    if differences:
        raise CheckpointError(f"{path} holds a different model:\n  " + "\n  ".join(differences))
