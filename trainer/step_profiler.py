"""``trainer.profile_steps=[FIRST,LAST]``: torch.profiler over those optimizer steps, written to
``<run>/profile/``: a Chrome/Perfetto trace (open it at https://ui.perfetto.dev or in
chrome://tracing) and a table of the operators and kernels that took the most time.

Why steps of the real run, not a separate benchmark: the time a user wants explained is the time
this configuration's step takes (its compile mode, batch, data loading, logging), and the first
steps of a run include compilation and autotuning, so the window is chosen past them. Each process
writes its own files (``rank{N}``), as their kernels differ under DDP and FSDP."""

import os
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .metrics import log

# Rows of the time table: enough to see past the matmuls to the first surprises.
TABLE_ROWS = 30
# Kernel names (Triton's, cuDNN's) run long; the default 55 characters cut what tells them apart.
NAME_WIDTH = 100


class StepProfiler:
    """Starts the profiler before step ``first`` and stops it after step ``last`` (both counted as
    the trainer's ``step`` is after the step: 1 is the first optimizer step)."""

    def __init__(self, steps: list[int] | None, run_dir: Path, device: torch.device, rank: int):
        self.first, self.last = steps if steps else (None, None)
        self.directory = Path(run_dir) / "profile"
        self.device, self.rank = device, rank
        self.profiler = None

    def unreachable(self, next_step: int, max_steps: int) -> str | None:
        """Why this run will not profile its window, if it will not: the window starts past the
        run's last step, or before the step it starts (resumes) at."""
        if self.first is None:
            return None
        if self.first > max_steps:
            return (f"trainer.profile_steps=[{self.first},{self.last}] starts past trainer.max_steps="
                    f"{max_steps}: nothing will be profiled")
        if self.first < next_step:
            return (f"trainer.profile_steps=[{self.first},{self.last}] starts before step {next_step}, "
                    "where this run resumes: nothing will be profiled")
        return None

    def before_step(self, step: int):
        """``step``: the number the coming step will have."""
        if self.first is None or step != self.first:
            return
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        # Shapes and memory too: which call allocated how much is the next question after time.
        self.profiler = profile(activities=activities, record_shapes=True, profile_memory=True)
        self.profiler.start()

    def after_step(self, step: int):
        """``step``: the number of the step just taken."""
        if self.profiler is None or step != self.last:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)     # the last step's kernels inside the window
        self.profiler.stop()
        self._write(step)

    def close(self, step: int):
        """Stop a window the run ended inside (stopped by a signal, or a failed step): the steps up
        to ``step``, the last one taken, are written."""
        if self.profiler is not None:
            self.profiler.stop()
            self._write(step)

    def _write(self, last: int):
        profiler, self.profiler = self.profiler, None
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"steps{self.first}-{last}_rank{self.rank}"
        trace = self.directory / f"{name}.json.gz"
        table = self.directory / f"{name}.txt"
        sort_by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        # Each file appears whole or not at all: written beside its final name, then renamed.
        partial_trace = self.directory / f".{name}.partial.json.gz"
        profiler.export_chrome_trace(str(partial_trace))      # a path ending in .gz is gzipped
        os.replace(partial_trace, trace)
        partial_table = table.with_suffix(".txt.partial")
        partial_table.write_text(profiler.key_averages().table(
            sort_by=sort_by, row_limit=TABLE_ROWS, max_name_column_width=NAME_WIDTH) + "\n")
        os.replace(partial_table, table)
        log.info(f"profile of steps {self.first}-{last}: {trace} (open in https://ui.perfetto.dev), "
                 f"top {TABLE_ROWS} by self time in {table}")
