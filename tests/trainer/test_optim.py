"""The learning-rate schedules: warmup, then cosine, linear, constant or warmup-stable-decay."""

import math

import pytest

from trainer.config import OptimConfig
from trainer.optim import lr_factor


def factors(max_steps, **settings):
    config = OptimConfig(warmup_steps=10, min_lr_ratio=0.1, **settings)
    return [lr_factor(step, config, max_steps) for step in range(max_steps)]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_every_schedule_warms_up_linearly_to_the_peak(schedule):
    assert factors(100, schedule=schedule)[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])


def test_cosine_and_linear_decay_from_the_peak_to_the_floor_over_the_rest():
    cosine, linear = factors(110, schedule="cosine"), factors(110, schedule="linear")
    assert cosine[10] == linear[10] == pytest.approx(1.0)
    assert cosine[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert linear[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert factors(110, schedule="constant")[10:] == [1.0] * 100


def test_wsd_holds_the_peak_then_decays_linearly_over_its_last_fraction():
    lr = factors(100, schedule="wsd", decay_fraction=0.2)
    assert lr[10:80] == [1.0] * 70                               # stable
    assert lr[80:] == pytest.approx([0.1 + 0.9 * (1 - i / 20) for i in range(20)])
    # raising max_steps during the stable phase leaves every lr used so far unchanged
    assert factors(200, schedule="wsd", decay_fraction=0.2)[:80] == lr[:80]
    # a decay longer than what follows the warmup starts right after it
    short = factors(20, schedule="wsd", decay_fraction=0.9)
    assert short[10] == 1.0 and short[15] == pytest.approx(0.1 + 0.9 * 0.5)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_a_decay_fraction_outside_the_run_is_refused(fraction):
    with pytest.raises(ValueError, match="optim.decay_fraction"):
        OptimConfig(schedule="wsd", decay_fraction=fraction)


def test_a_resume_that_raises_max_steps_in_the_stable_phase_keeps_the_peak_rate(tmp_path):
    from trainer.loop import Trainer, run
    from .helpers import compose_run, tiny_overrides
    settings = {"optim.schedule": "wsd", "optim.decay_fraction": 0.25, "optim.warmup_steps": 2,
                "trainer.save_interval": 4, "trainer.keep_checkpoints": 5, "trainer.eval_interval": 100}
    run(compose_run(tiny_overrides(tmp_path, **settings, **{"trainer.max_steps": 8})), tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000004")   # back to step 4
    longer = Trainer(compose_run(tiny_overrides(tmp_path, **settings, **{"trainer.max_steps": 16,
                                                                          "resume": "true"})),
                     tmp_path / "run")
    try:
        assert longer.step == 4
        # the 8-step run decayed from its step 6; the 16-step one holds the peak until step 12
        for _ in range(3):
            longer.train_step()
        assert longer.scheduler.get_last_lr()[0] == pytest.approx(longer.config.optim.lr)
        assert lr_factor(7, longer.config.optim, 8) < 1.0
    finally:
        longer.close(False)
