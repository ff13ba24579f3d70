"""A run out of GPU memory stops with a short message naming the step, the batch and what to change.
The GPU's error is raised by a stand-in (torch.OutOfMemoryError, as the CUDA allocator raises it),
so the CPU runs these."""

import subprocess
import sys
import textwrap

import pytest
import torch

from trainer.loop import Trainer, run
from trainer.out_of_memory import OutOfMemory

from .helpers import ROOT, compose_run, tiny_overrides

ALLOCATOR_ERROR = ("CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacity of "
                   "79.19 GiB of which 1.12 GiB is free.\nOf the allocated memory 74.3 GiB is allocated by PyTorch")


def _stop(tmp_path, monkeypatch, step: int, method: str = "train_step", **extra) -> OutOfMemory:
    """Run the tiny config with ``Trainer.<method>`` out of memory from ``step`` on (the step it
    would take, for a training step; the step just taken, for an evaluation)."""
    real = getattr(Trainer, method)

    def failing(self, *args, **kwargs):
        if self.step + (method == "train_step") >= step:
            raise torch.OutOfMemoryError(ALLOCATOR_ERROR)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Trainer, method, failing)
    with pytest.raises(OutOfMemory) as stop:
        run(compose_run(tiny_overrides(tmp_path, **extra)), tmp_path / "run")
    return stop.value


def test_a_training_step_out_of_memory_names_the_step_batch_and_remedies(tmp_path, monkeypatch):
    stop = _stop(tmp_path, monkeypatch, 4, **{"trainer.save_interval": 2})
    text = str(stop)
    assert text.startswith("out of GPU memory in training step 4 (gpt2_tiny, 2 sequences x 32 tokens "
                           "per micro-batch, fp32, sdpa attention).")
    assert "PyTorch: CUDA out of memory. Tried to allocate 3.00 GiB." in text
    assert "trainer.micro_batch_size=1 trainer.grad_accum=2" in text
    assert "model.checkpoint_blocks=true" in text and "model.attention=flash" not in text
    assert f"{tmp_path / 'run' / 'checkpoints' / 'step_00000002'}; resume=true continues" in text
    assert isinstance(stop.__cause__, torch.OutOfMemoryError)      # kept for the full traceback


def test_an_evaluation_out_of_memory_and_the_remedies_that_apply(tmp_path, monkeypatch):
    text = str(_stop(tmp_path, monkeypatch, 3, "evaluate", **{
        "model.attention": "eager", "model.checkpoint_blocks": "true", "trainer.micro_batch_size": 1}))
    assert text.startswith("out of GPU memory in the evaluation at step 3 (gpt2_tiny, 1 sequences x 32 "
                           "tokens per micro-batch, fp32, eager attention, blocks checkpointed).")
    assert "model.attention=flash" in text
    assert "micro_batch_size=" not in text and "checkpoint_blocks=true" not in text
    assert "resume=true" not in text                    # step 3's checkpoint comes after its evaluation


def test_the_command_line_prints_the_message_without_a_traceback(tmp_path):
    overrides = tiny_overrides(tmp_path) + [f"hydra.run.dir={tmp_path / 'run'}"]
    script = textwrap.dedent(f"""
        import sys, torch
        from trainer.loop import Trainer
        def failing(self):
            raise torch.OutOfMemoryError({ALLOCATOR_ERROR!r})
        Trainer.train_step = failing
        sys.argv = ["trainer"] + {overrides!r}
        from trainer.__main__ import entry_point
        entry_point()
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: out of GPU memory in training step 1" in result.stderr
    assert "Traceback" not in result.stderr
