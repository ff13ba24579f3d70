"""What the console shows of a run: a progress bar on a terminal, a line per log window in a
batch job's log (``trainer.progress``), and log lines written above the bar rather than through it."""

import contextlib
import logging
import sys

from tqdm import tqdm

# ``extra=`` of a log window's line: always in train.log; on the console only when no progress
# bar is there to show the same numbers.
WINDOW_LINE = {"window": True}


class ConsoleHandler(logging.StreamHandler):
    """The console handler: each line is written above the progress bar, if one is drawn
    (``tqdm.write``), so log lines never tear it, and while ``bar_shown`` the log windows' lines
    are left to the bar."""
    bar_shown = False

    def filter(self, record) -> bool:
        return not (self.bar_shown and getattr(record, "window", False)) and super().filter(record)

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def wants_progress_bar(progress: str, stream=None) -> bool:
    """``trainer.progress``: "bar", "lines", or "auto" (a bar when the stream, stderr by default,
    is a terminal; in a batch job's log file a bar would write a carriage-return update a step)."""
    if progress != "auto":
        return progress == "bar"
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


@contextlib.contextmanager
def data_progress_bars(shown: bool):
    """The data pipeline's bars (datasets' tokenizing map, the shard writer, which follows
    datasets' switch) shown or hidden with the training bar; datasets' setting is restored after."""
    # imported here: the tools that read runs (trainer.plot_metrics) load this module without datasets
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    hide = not shown and not are_progress_bars_disabled()
    if hide:
        disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            enable_progress_bars()


def show_progress_bar(log: logging.Logger, shown: bool):
    """Tell ``log``'s console whether a bar now carries the log windows' numbers."""
    for handler in log.handlers:
        if isinstance(handler, ConsoleHandler):
            handler.bar_shown = shown


def duration_text(seconds: float) -> str:
    """A duration as a progress line gives it: "45 s", "3 min 5 s", "2 h 14 min"."""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
