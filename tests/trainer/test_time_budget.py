"""``trainer.max_minutes``: a run stops before its time budget is spent, saved and resumable, and
says so with its own exit status."""

import pytest

from trainer.loop import Trainer
from trainer.metrics import read_metrics
from trainer.time_budget import EXIT_TIME_BUDGET, STOPPED_BY_BUDGET, TimeBudget

from .helpers import compose_run, fit_with_hook, run_cli, tiny_overrides


class Clock:
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


def test_the_budget_stops_at_the_last_log_step_whose_next_window_still_fits():
    clock = Clock()
    budget = TimeBudget(10, clock=clock)               # 600 s from t = 0
    clock.now = 100                                    # data and model built
    budget.training_started()
    verdicts = []
    # windows of 150 s (compilation), then 60 s, one of 90 s (an evaluation), then 60 s again
    for now in (250, 310, 400, 460, 520):
        clock.now = now
        verdicts.append(budget.next_window_overruns())
    # at 250 only the first window is known: 250 + 150 < 600; from then on it no longer counts,
    # the longest steady window does: 310 + 60, 400 + 90, 460 + 90 < 600; 520 + 90 >= 600
    assert verdicts == [False, False, False, False, True]


def test_a_first_window_alone_counts_in_full():
    clock = Clock()
    budget = TimeBudget(1, clock=clock)
    budget.training_started()
    clock.now = 35                                     # one window of 35 s: another would end at 70
    assert budget.next_window_overruns()


def test_without_a_budget_the_run_never_stops_early():
    clock = Clock()
    budget = TimeBudget(None, clock=clock)
    budget.training_started()
    clock.now = 1e9
    assert not budget.next_window_overruns()


def test_a_run_stops_within_its_budget_with_a_checkpoint_and_resumes(tmp_path):
    """One minute a step, logged every 2 steps, 5.5 minutes: at step 4 (minute 4) another window
    would end at minute 6, past the budget, so the run saves and stops there."""
    overrides = tiny_overrides(tmp_path, **{"trainer.max_steps": 10, "trainer.log_interval": 2,
                                            "trainer.save_interval": 100, "trainer.eval_interval": 100,
                                            "trainer.max_minutes": 5.5})
    trainer = Trainer(compose_run(overrides), tmp_path / "run")
    clock = Clock(1000.0)
    trainer.budget = TimeBudget(5.5, clock=clock)

    def one_minute_a_step():
        clock.now += 60

    summary = fit_with_hook(trainer, one_minute_a_step)
    run_dir = tmp_path / "run"
    assert summary["interrupted"] == STOPPED_BY_BUDGET and summary["steps"] == 4
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not (run_dir / "model.pt").exists()
    assert read_metrics(run_dir)["events"][-1] == {"event": "interrupted", "step": 4, "max_minutes": 5.5}
    assert "trainer.max_minutes=5.5 reached: stopped after step 4" in (run_dir / "train.log").read_text()
    # resumed with no budget, the run finishes from there
    resumed = Trainer(compose_run(overrides[:-1] + ["resume=true"]), run_dir)
    try:
        finished = resumed.fit()
    finally:
        resumed.close()
    assert finished["steps"] == 10 and "interrupted" not in finished
    assert (run_dir / "model.pt").exists()


def test_the_command_exits_75_and_a_job_loop_on_it_finishes_the_run(tmp_path):
    """A budget shorter than any step: each invocation trains one step past its checkpoint, stops
    with status 75 and prints the command that resumes; the same command finishes the run."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(tmp_path, **{"trainer.max_steps": 2, "trainer.save_interval": 100,
                                       "trainer.max_minutes": 1e-9}) + [f"hydra.run.dir={run_dir}"]
    first = run_cli(args)
    assert first.returncode == EXIT_TIME_BUDGET, first.stderr[-2000:]
    assert "time budget: this invocation stops at a log step before 1e-09 min" in first.stderr
    assert "trainer.max_minutes=1e-09 reached: stopped after step 1" in first.stderr
    command = first.stderr.split("Resume with:")[1].strip().splitlines()[0]
    assert "trainer.max_minutes=1e-09" in command and "resume=true" in command
    second = run_cli(args + ["resume=true"])
    assert second.returncode == 0, second.stderr[-2000:]     # step 2 is the last: nothing to stop
    assert (run_dir / "model.pt").exists()
    assert [e["event"] for e in read_metrics(run_dir)["events"]] == ["interrupted", "resume"]


def test_the_budget_must_be_positive(tmp_path):
    with pytest.raises(Exception, match="trainer.max_minutes"):
        compose_run(tiny_overrides(tmp_path, **{"trainer.max_minutes": 0}))
