"""``trainer.max_minutes``: a wall-clock budget for one invocation of a run, for jobs that a
scheduler kills at a time limit without a warning signal first (a signal, where one comes, is
handled by ``stop_signals.py``). The run stops at the last log step from which one more log window
would still end inside the budget, saves a checkpoint and exits with ``EXIT_TIME_BUDGET``;
``resume=true`` continues it."""

import time

# EX_TEMPFAIL in sysexits.h: "a temporary failure; the user is invited to retry". A job script
# tells it from a finished run (0), a stop on a signal (128 + its number) and an error (1 or 2).
EXIT_TIME_BUDGET = 75
STOPPED_BY_BUDGET = "trainer.max_minutes"


class TimeBudget:
    """Counts from its creation: the run's start in this process, data preparation and compilation
    included, as a scheduler's limit counts them."""

    def __init__(self, minutes: float | None, clock=time.monotonic):
        self.seconds = None if minutes is None else 60.0 * minutes
        self.clock = clock
        self.started = clock()
        self._window_start = None
        self._windows = []

    def training_started(self):
        """The first log window starts here."""
        self._window_start = self.clock()

    def next_window_overruns(self) -> bool:
        """At a log step: would one more window (as long as the longest so far, evaluations and
        checkpoints included) end past the budget? The first window, which holds the compilation
        and warm-up, counts only until a second one has been seen."""
        if self.seconds is None:
            return False
        now = self.clock()
        if self._window_start is not None:
            self._windows.append(now - self._window_start)
        self._window_start = now
        steady = self._windows[1:] or self._windows
        return now - self.started + max(steady, default=0.0) >= self.seconds
