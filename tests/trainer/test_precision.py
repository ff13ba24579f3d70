"""trainer.precision=auto: bf16 where the hardware computes it, float32 on CPUs that would emulate it."""

import pytest
import torch

from trainer import precision
from trainer.precision import resolve_precision

CPU, GPU = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [False, True])
def test_auto_picks_bf16_only_where_it_is_native(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", CPU) == ("bf16" if native else "fp32", None)
    assert resolve_precision("auto", GPU) == ("bf16", None)
    assert resolve_precision("fp32", CPU) == ("fp32", None)


def test_an_explicit_emulated_bf16_is_kept_with_a_warning(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    chosen, warning = resolve_precision("bf16", CPU)
    assert chosen == "bf16" and "emulated" in warning and "auto" in warning


def test_fp16_on_a_cpu_is_refused():
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", CPU)


def test_a_run_records_the_resolved_precision(tmp_path, monkeypatch):
    from trainer.loop import Trainer
    from .helpers import compose_run, tiny_overrides
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    trainer = Trainer(compose_run(tiny_overrides(tmp_path, **{"trainer.precision": "auto"})), tmp_path / "run")
    assert trainer.precision == "fp32" and trainer.config.trainer.precision == "fp32"
    trainer.close()
