"""Stopping a run before ``trainer.max_steps``: on a signal (``stop_signals.py``) or at the time
budget (``time_budget.py``). Several processes must agree on the step (one may have been
signalled, or later, and their clocks differ): they compare at log steps, where the loop waits for
the GPU anyway, so the checks cost no extra synchronization. A stopped run is saved, and the
command that resumes it is printed."""

from .checkpoint import latest_checkpoint
from .metrics import log
from .stop_signals import StopSignals, resume_command
from .time_budget import STOPPED_BY_BUDGET


def stop_reason(trainer, signals: StopSignals, logged: bool, at_end: bool) -> str | None:
    """Why the run stops after this step (a signal's name, or ``STOPPED_BY_BUDGET``), or None.
    One process stops right after the step in which a signal came."""
    context = trainer.context
    if at_end:
        return None
    if not context.enabled and signals.received is not None:
        return signals.name
    if context.enabled and logged and context.any(signals.received is not None, trainer.device):
        return signals.name or "a signal on another process"
    if logged and trainer.budget.seconds is not None:
        if context.any(trainer.budget.next_window_overruns(), trainer.device):
            return STOPPED_BY_BUDGET
    return None


def stop_run(trainer, reason: str, saved: bool) -> str:
    """Stop after this step: saved (unless this step already was), the stop recorded in
    metrics.jsonl, and the command that resumes the run printed. Returns ``reason``."""
    if not saved:
        trainer.check_finite()
        trainer.save()
    minutes = trainer.config.trainer.max_minutes
    by_budget = reason == STOPPED_BY_BUDGET
    trainer.metrics.write({"event": "interrupted", "step": trainer.step,
                           **({"max_minutes": minutes} if by_budget else {"signal": reason})})
    if trainer.context.is_main:
        why = f"{reason}={minutes} reached" if by_budget else reason
        log.warning(f"{why}: stopped after step {trainer.step} and saved "
                    f"{latest_checkpoint(trainer.run_dir)}.\nResume with:\n"
                    f"  {resume_command(trainer.run_dir)}")
    return reason
