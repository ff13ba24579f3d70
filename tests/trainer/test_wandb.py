"""Weights & Biases: offline files and one run id across resumes, the run's summary, and a resume
that sends only the steps wandb has not logged."""

import re

from trainer.loop import run
from trainer.metrics import read_metrics

from .helpers import compose_run, tiny_overrides


class RecordedRun:
    """What a wandb run is given, in place of wandb.init's run: the steps logged, the summary and
    whether it was finished."""

    def __init__(self):
        self.summary, self.steps, self.finished = {}, [], False

    def log(self, record, step):
        self.steps.append(step)

    def finish(self):
        self.finished = True


def _record_wandb(monkeypatch) -> list:
    """Replace wandb.init; the runs it would have made are appended to the returned list."""
    import wandb
    runs = []
    monkeypatch.setattr(wandb, "init", lambda **settings: runs.append(RecordedRun()) or runs[-1])
    return runs


def test_wandb_offline_files_are_written_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    overrides = tiny_overrides(tmp_path, logger="wandb", **{"trainer.max_steps": 2})
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(compose_run(overrides), tmp_path / "run")
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    run(compose_run(overrides + ["resume=true", "trainer.max_steps=3"]), tmp_path / "run")
    run_id = (tmp_path / "run" / "wandb_id").read_text().strip()
    sessions = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    # wandb writes one directory per offline session; all carry the run's id, and `wandb sync`
    # uploads them into that one run. Two sessions started in the same second share a timestamp,
    # and wandb then adds "-1" to the second directory's name.
    assert len(sessions) == 2
    assert all(re.search(rf"-{run_id}(-\d+)?$", p.name) for p in sessions), [p.name for p in sessions]


def test_the_whole_run_summary_becomes_the_wandb_summary(tmp_path, monkeypatch):
    runs = _record_wandb(monkeypatch)
    run(compose_run(tiny_overrides(tmp_path, logger="wandb", **{"trainer.max_steps": 4})), tmp_path / "run")
    (wandb_run,) = runs
    assert wandb_run.finished
    assert wandb_run.summary["summary/steps"] == 4 and wandb_run.summary["summary/best_val_step"] in (3, 4)
    assert wandb_run.summary["summary/best_val_ppl"] == min(r["val_ppl"] for r in
                                                            read_metrics(tmp_path / "run")["eval"])


def test_a_resume_sends_wandb_only_the_steps_it_has_not_logged(tmp_path, monkeypatch):
    """wandb's history only moves forward: the steps a resume replays (and its event line) stay in
    metrics.jsonl, and wandb gets the steps after the last one it had."""
    runs = _record_wandb(monkeypatch)
    settings = {"trainer.save_interval": 3, "trainer.keep_checkpoints": 5}
    run(compose_run(tiny_overrides(tmp_path, logger="wandb", **settings)), tmp_path / "run")
    assert runs[0].steps and max(runs[0].steps) == 6
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000003")
    run(compose_run(tiny_overrides(tmp_path, logger="wandb", resume="true",
                                   **settings, **{"trainer.max_steps": 8})), tmp_path / "run")
    assert sorted(set(runs[1].steps)) == [7, 8] and runs[1].finished
    train = read_metrics(tmp_path / "run")["train"]
    assert [r["step"] for r in train] == list(range(1, 9))     # the replayed steps, as trained again
