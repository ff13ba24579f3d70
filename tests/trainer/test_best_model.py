"""``trainer.save_best``: best_model.pt holds the weights of the lowest validation loss, across
resumes, and every tool reads it."""

import math

import pytest
import torch

from trainer.checkpoint import CheckpointError
from trainer.loop import Trainer, run
from trainer.model_source import find_model

from .helpers import compose_run, tiny_overrides


@pytest.fixture
def scripted_losses(monkeypatch):
    """Evaluation returns the validation loss the test sets for each step."""
    losses = {}

    def evaluate(trainer):
        loss = losses[trainer.step]
        return {"step": trainer.step, "val_loss": loss, "val_ppl": math.exp(loss)}
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    return losses


def _overrides(tmp_path, steps, **extra):
    return tiny_overrides(tmp_path, **{"trainer.max_steps": steps, "trainer.eval_interval": 1,
                                       "trainer.save_interval": 1, "trainer.keep_checkpoints": 10,
                                       "trainer.save_best": "true", **extra})


def _saved(path):
    return torch.load(path, weights_only=True)


def test_the_best_evaluation_s_weights_are_kept_and_every_tool_reads_them(tmp_path, scripted_losses):
    scripted_losses.update({1: 5.0, 2: 3.0, 3: 4.0, 4: 3.5})
    run_dir = tmp_path / "run"
    run(compose_run(_overrides(tmp_path, 4)), run_dir)
    best = _saved(run_dir / "best_model.pt")
    assert (best["step"], best["val_loss"]) == (2, 3.0)
    at_step_2 = _saved(run_dir / "checkpoints" / "step_00000002" / "state.pt")["model"]
    assert all(torch.equal(best["model"][k], v) for k, v in at_step_2.items())
    final = _saved(run_dir / "model.pt")["model"]
    assert not all(torch.equal(best["model"][k], v) for k, v in final.items())
    model = find_model(run_dir / "best_model.pt").load()       # as sample, export and evaluate load it
    assert all(torch.equal(model.state_dict()[k], v) for k, v in at_step_2.items())
    assert f"3.0000 at step 2: {run_dir / 'best_model.pt'}" in (run_dir / "train.log").read_text()


@pytest.mark.parametrize("later, best_step", [({4: 3.5, 5: 3.2}, 2), ({4: 3.5, 5: 2.0}, 5)])
def test_a_resumed_run_holds_later_evaluations_to_the_saved_bar(tmp_path, scripted_losses, later, best_step):
    scripted_losses.update({1: 5.0, 2: 3.0, 3: 4.0, **later})
    run_dir = tmp_path / "run"
    run(compose_run(_overrides(tmp_path, 3)), run_dir)
    run(compose_run(_overrides(tmp_path, 5) + ["resume=true"]), run_dir)
    assert _saved(run_dir / "best_model.pt")["step"] == best_step


def test_a_fresh_run_replaces_an_earlier_best_and_none_is_written_when_off(tmp_path, scripted_losses):
    scripted_losses.update({1: 9.0, 2: 9.5})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"step": 7, "val_loss": 1.0}, run_dir / "best_model.pt")     # left by an earlier run
    run(compose_run(_overrides(tmp_path, 2)), run_dir)
    assert _saved(run_dir / "best_model.pt")["step"] == 1
    run(compose_run(_overrides(tmp_path, 2, **{"trainer.save_best": "false"})), tmp_path / "off")
    assert not (tmp_path / "off" / "best_model.pt").exists()


def test_an_unreadable_best_model_stops_the_resume_naming_it(tmp_path, scripted_losses):
    scripted_losses.update({1: 5.0, 2: 4.0})
    run_dir = tmp_path / "run"
    run(compose_run(_overrides(tmp_path, 2)), run_dir)
    for foreign in (b"not a torch file", {"model": {}}):          # truncated; without step and loss
        if isinstance(foreign, bytes):
            (run_dir / "best_model.pt").write_bytes(foreign)
        else:
            torch.save(foreign, run_dir / "best_model.pt")
        with pytest.raises(CheckpointError, match=r"best_model.pt is not readable as a best model "
                                                  r"\(.+\); .*trainer.save_best=false"):
            Trainer(compose_run(_overrides(tmp_path, 3) + ["resume=true"]), run_dir)
