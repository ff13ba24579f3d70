"""One run per run directory: an exclusive lock held for the run's lifetime.

Two processes writing one run directory interleave metrics.jsonl and race on the checkpoint
staging directories. The lock is ``flock`` on ``<run>/.lock``: the kernel releases it when the
process ends, however it ends, so a crashed run never leaves a stale lock behind.
"""

import fcntl
import os
from pathlib import Path


class RunDirectoryBusy(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise RunDirectoryBusy(f"{run_dir} is in use by another run (process {holder}); wait for it "
                                   "to finish or choose another hydra.run.dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self):
        if not self.file.closed:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
