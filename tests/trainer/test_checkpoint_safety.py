"""Checkpoints are data, never code; nothing is lost or resumed silently from a damaged file."""

import logging
import os

import pytest
import torch

from trainer import checkpoint as checkpoint_module
from trainer.checkpoint import CheckpointError
from trainer.loop import Trainer, run
from trainer.run_lock import RunDirectoryBusy, RunLock

from .helpers import compose_run, tiny_overrides


class Payload:
    """Unpickling this would create a file: the attack a checkpoint must not allow."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _trained(tmp_path, steps=6):
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": steps})
    run(compose_run(overrides), tmp_path / "run")
    return overrides, tmp_path / "run" / "checkpoints"


def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    overrides, root = _trained(tmp_path, steps=3)
    marker = tmp_path / "pwned"
    state = root / "step_00000003" / "state.pt"
    torch.save({"model": Payload(str(marker)), "step": 3}, state)
    checkpoint_module._write_manifest(state.parent)         # an attacker can rewrite the manifest too
    with pytest.raises(CheckpointError, match="refused to load") as refused:
        Trainer(compose_run(overrides + ["resume=true"]), tmp_path / "run")
    assert not marker.exists()
    assert "Unsupported global" in str(refused.value) and "weights_only" not in str(refused.value)


def test_missing_latest_refuses_and_keeps_every_checkpoint(tmp_path):
    overrides, root = _trained(tmp_path)
    before = sorted(p.name for p in root.iterdir())
    (root / "latest").unlink()
    for extra in ([], ["resume=true"]):
        with pytest.raises(CheckpointError, match="step_00000003, step_00000006 but no 'latest'.*echo step_00000006"):
            Trainer(compose_run(overrides + extra), tmp_path / "run")
    assert sorted(p.name for p in root.iterdir()) == [n for n in before if n != "latest"]


@pytest.mark.parametrize("content,message", [("../other/step_00000003", "may only name"),
                                             ("/tmp/step_00000003", "may only name"),
                                             ("", "is empty")])
def test_latest_may_only_name_its_own_step_directories(tmp_path, content, message):
    overrides, root = _trained(tmp_path, steps=3)
    (root / "latest").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        Trainer(compose_run(overrides + ["resume=true"]), tmp_path / "run")


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    overrides, root = _trained(tmp_path)
    _flip_a_byte(root / "step_00000006" / "state.pt")
    # The run's logger does not propagate to the root, where caplog listens: listen on it directly.
    flashtrain_log = logging.getLogger("flashtrain")
    flashtrain_log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="flashtrain"):
            trainer = Trainer(compose_run(overrides + ["resume=true", "trainer.max_steps=8"]),
                              tmp_path / "run")
    finally:
        flashtrain_log.removeHandler(caplog.handler)
    assert trainer.step == 3
    trainer.close()
    assert "resuming from step_00000003 instead of step_00000006" in caplog.text
    assert "SHA-256" in caplog.text


def test_no_intact_checkpoint_is_an_error_naming_each(tmp_path):
    overrides, root = _trained(tmp_path)
    for name in ("step_00000003", "step_00000006"):
        _flip_a_byte(root / name / "state.pt")
    with pytest.raises(CheckpointError, match="no intact checkpoint(.|\n)*step_00000006(.|\n)*step_00000003"):
        Trainer(compose_run(overrides + ["resume=true"]), tmp_path / "run")


def test_a_second_run_in_the_same_directory_is_refused(tmp_path):
    overrides = tiny_overrides(tmp_path)
    (tmp_path / "run").mkdir()
    holder = RunLock(tmp_path / "run")
    with pytest.raises(RunDirectoryBusy, match=f"in use by another run \\(process {os.getpid()}\\)"):
        Trainer(compose_run(overrides), tmp_path / "run")
    holder.release()
    trainer = Trainer(compose_run(overrides), tmp_path / "run")      # free again once released
    trainer.close()


def test_a_resume_refuses_changed_settings_and_logs_allowed_ones(tmp_path):
    overrides, _ = _trained(tmp_path, steps=3)
    with pytest.raises(CheckpointError, match=r"optim.lr: 0.002 -> 0.001(.|\n)*trainer.micro_batch_size: 2 -> 4"):
        Trainer(compose_run(overrides + ["resume=true", "optim.lr=1e-3", "trainer.micro_batch_size=4"]),
                tmp_path / "run")
    trainer = Trainer(compose_run(overrides + ["resume=true", "trainer.max_steps=5"]), tmp_path / "run")
    trainer.close()
    assert "resume: trainer.max_steps: 3 -> 5" in (tmp_path / "run" / "train.log").read_text()


def test_a_checkpoint_from_before_a_new_setting_still_resumes(tmp_path):
    # Keys added since a checkpoint was written are absent from its config; at their defaults they
    # are no change, and the changes a resume may make stay allowed.
    from dataclasses import asdict

    from trainer.checkpoint import config_changes
    current = asdict(compose_run(tiny_overrides(tmp_path, **{"trainer.profile_steps": "[2,3]"})))
    saved = {**current, "trainer": {k: v for k, v in current["trainer"].items()
                                    if k not in ("progress", "profile_steps")}}
    # progress keeps its default: no change; the profile window is a change a resume may make
    assert config_changes(saved, current, tmp_path) == [
        "trainer.profile_steps: (not in the checkpoint) -> [2, 3]"]
    # a key a resume may not change is refused even when the checkpoint predates it
    saved = {**current, "trainer": {k: v for k, v in current["trainer"].items() if k != "grad_accum"}}
    current["trainer"]["grad_accum"] = 2
    with pytest.raises(CheckpointError, match=r"trainer.grad_accum: \(not in the checkpoint\) -> 2"):
        config_changes(saved, current, tmp_path)


def test_a_refused_launch_leaves_the_runs_hydra_record(tmp_path):
    from .helpers import run_cli
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 2, "optim.lr": "0.002"})
    first = run_cli([*overrides, f"hydra.run.dir={run_dir}"])
    assert first.returncode == 0, first.stderr[-2000:]
    record = {name: (run_dir / ".hydra" / name).read_text()
              for name in ("config.yaml", "overrides.yaml", "hydra.yaml")}
    assert "lr: 0.002" in record["config.yaml"] and "optim.lr=0.002" in record["overrides.yaml"]
    tokenizer = (run_dir / "tokenizer.json").read_text()
    # another vocabulary means another tokenizer: the refused launch must not write its own
    refused = run_cli([*overrides, "optim.lr=0.001", "data.vocab_size=280", "resume=true",
                       f"hydra.run.dir={run_dir}"])
    assert refused.returncode == 2 and "vocab_size: checkpoint 300, this run 280" in refused.stderr
    assert {name: (run_dir / ".hydra" / name).read_text() for name in record} == record
    assert (run_dir / "tokenizer.json").read_text() == tokenizer
    unknown_group = run_cli(["model=no_such_model", f"hydra.run.dir={run_dir}"])
    assert unknown_group.returncode == 2 and "no_such_model" in unknown_group.stderr
    assert "Traceback" not in unknown_group.stderr


def test_a_full_disk_names_itself_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 4, "trainer.save_interval": 2})
    trainer = Trainer(compose_run(overrides), tmp_path / "run")
    try:
        for _ in range(2):
            trainer.train_step()
        trainer.save()
        before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints" / "step_00000002").iterdir()}

        def full(obj, path):     # what torch.save raises on a full filesystem
            open(path, "wb").write(b"partial")
            raise RuntimeError("basic_ios::clear: iostream error")

        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(checkpoint_module.torch, "save", full)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 0))
        trainer.train_step()
        trainer.train_step()
        with pytest.raises(CheckpointError, match=r"no space left on .*checkpoints(.|\n)*step_00000002 is intact"):
            trainer.save()
    finally:
        trainer.close()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert {p.name: p.read_bytes() for p in (root / "step_00000002").iterdir()} == before


def test_a_full_disk_while_writing_the_token_cache_is_named(tmp_path, monkeypatch):
    import errno
    from trainer.data import DataError, build_data
    from trainer.data import shards as shards_module
    from .test_data import config

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards_module.os, "posix_fallocate", no_space)
    cfg = config(tmp_path)
    with pytest.raises(DataError, match="no space left on .*shards for the token cache"):
        build_data(cfg, batch_size=2, log=lambda *_: None)
    assert list((tmp_path / "cache" / "shards").iterdir()) == []


def test_save_minutes_adds_checkpoints_at_log_steps_once_the_time_has_passed(tmp_path, monkeypatch):
    """With save_minutes, a log step saves once that long has passed since the last checkpoint;
    the step interval still saves too."""
    from trainer import loop as loop_module
    clock = [1000.0]
    monkeypatch.setattr(loop_module.time, "time", lambda: clock[0])

    def one_minute_a_step(trainer):
        clock[0] += 60
        return real_step(trainer)
    real_step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", one_minute_a_step)
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 9, "trainer.log_interval": 2,
                                            "trainer.save_interval": 100, "trainer.save_minutes": 3.5,
                                            "trainer.keep_checkpoints": 10, "trainer.eval_interval": 100})
    run(compose_run(overrides), tmp_path / "run")
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    # log steps 2, 4, 6, 8 at minutes 2, 4, 6, 8: due at 4 (4 >= 3.5) and at 8 (4 since), then the end
    assert saved == ["step_00000004", "step_00000008", "step_00000009"]


def test_save_minutes_must_be_positive(tmp_path):
    with pytest.raises(Exception, match="trainer.save_minutes"):
        compose_run(tiny_overrides(tmp_path, **{"trainer.save_minutes": 0}))


def test_a_resume_names_a_different_head_and_older_checkpoints_mean_a_tied_one(tmp_path):
    import dataclasses
    from models import ModelConfig
    from trainer.checkpoint import check_compatible
    current = dataclasses.asdict(ModelConfig(arch="rope", vocab_size=97, max_seqlen=64, d_model=64,
                                             n_layer=2, n_head=4))
    written_before_the_field = {key: value for key, value in current.items() if key != "tie_embeddings"}
    check_compatible(written_before_the_field, current, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="tie_embeddings: checkpoint False, this run True"):
        check_compatible({**current, "tie_embeddings": False}, current, tmp_path / "state.pt")
