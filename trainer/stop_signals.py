"""Stop a run cleanly on SIGINT (Ctrl-C), SIGTERM (kill, schedulers) and SIGUSR1 (the usual
preemption warning on clusters): the handler only records the signal; the loop finishes the step it
is in, saves a checkpoint and says how to resume. A second Ctrl-C stops at once (the checkpoint
write is atomic, so that loses at most the save in progress)."""

import shlex
import signal
import threading
from pathlib import Path

HANDLED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopSignals:
    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    @property
    def name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self):
        # Python delivers signals to the main thread only; elsewhere (a notebook worker) keep defaults.
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run: its own overrides, resume=true, its directory."""
    try:
        from hydra.core.hydra_config import HydraConfig
        overrides = [o for o in HydraConfig.get().overrides.task
                     if not o.startswith(("resume=", "hydra.run.dir=", "+resume="))]
    except ValueError:               # not launched through Hydra (a script or a test)
        overrides = ["<the same overrides>"]
    return " ".join(["python -m trainer", *map(shlex.quote, overrides), "resume=true",
                     shlex.quote(f"hydra.run.dir={run_dir}")])
