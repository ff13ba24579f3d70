"""``python -m trainer [overrides]``: launch a run from the Hydra configs in configs/.

With no arguments it runs the quickstart. Errors in the configuration or the data exit with a short
message naming the problem (set HYDRA_FULL_ERROR=1 for the traceback). SIGINT (Ctrl-C), SIGTERM and
SIGUSR1 stop the run after its current step with a checkpoint and the command that resumes it; the
exit status is then 128 + the signal's number (130 for Ctrl-C). With ``trainer.max_minutes`` the
run stops the same way before that time has passed and exits with status 75.
"""

import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from .checkpoint import CheckpointError
from .config import register_configs, unknown_keys
from .data import DataError
from .loop import NonFiniteLoss, run
from .metrics import read_metrics
from .out_of_memory import OutOfMemory
from .run_lock import RunDirectoryBusy
from .run_summary import format_table, summarize
from .time_budget import EXIT_TIME_BUDGET, STOPPED_BY_BUDGET

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
register_configs()


class JobFailed(Exception):
    """A run that cannot start or continue; the message names the problem."""


# Jobs of this process's sweep that failed: (job number, overrides, message). A failed job does not
# stop the sweep; the process exits non-zero once every job has run.
FAILED_JOBS: list[tuple[int, str, str]] = []
JOBS_RUN = [0]
# Jobs of this process's sweep that finished: (job number, overrides, run directory), compared in
# one table once the sweep is done.
FINISHED_JOBS: list[tuple[int, list[str], Path]] = []


def _fail(message: str):
    if os.environ.get("HYDRA_FULL_ERROR") == "1" and sys.exc_info()[0] is not None:
        raise
    raise JobFailed(message)


def write_hydra_record(cfg, run_dir: Path):
    """What Hydra would have written to ``.hydra/`` (the composed config, the command-line
    overrides, Hydra's own settings), each file atomically, once the run has been accepted."""
    record = run_dir / ".hydra"
    record.mkdir(exist_ok=True)
    hydra_config = HydraConfig.get()
    for name, content in (("config.yaml", cfg), ("overrides.yaml", list(hydra_config.overrides.task)),
                          ("hydra.yaml", {"hydra": hydra_config})):
        staging = record / f".{name}.tmp"
        OmegaConf.save(OmegaConf.create(content) if not OmegaConf.is_config(content) else content, staging)
        os.replace(staging, record / name)


def _launch(cfg):
    unknown = unknown_keys(cfg)
    if unknown:
        _fail("unknown configuration key(s): " + ", ".join(unknown))
    try:
        config = OmegaConf.to_object(cfg)        # builds the dataclasses: their checks run here
    except Exception as error:  # noqa: BLE001 - Hydra/OmegaConf raise several kinds; all are config errors
        message = str(error).strip().splitlines()
        _fail("invalid configuration: " + " ".join(message[:4]))
    try:
        summary = run(config, Path(HydraConfig.get().runtime.output_dir),
                      on_start=lambda trainer: write_hydra_record(cfg, trainer.run_dir))
    except KeyboardInterrupt:
        # Ctrl-C before the first step (tokenizing, compiling) or a second Ctrl-C: nothing to save.
        print("interrupted before a checkpoint could be saved", file=sys.stderr)
        sys.exit(130)
    except (DataError, CheckpointError, NonFiniteLoss, OutOfMemory, RunDirectoryBusy, ValueError,
            FileNotFoundError) as error:
        _fail(str(error))
    if summary.get("interrupted") == STOPPED_BY_BUDGET:
        sys.exit(EXIT_TIME_BUDGET)
    if summary.get("interrupted"):
        # 128 + the signal number, as a shell reports a process a signal stopped: a scheduler or
        # wrapper script sees that the run did not finish and can requeue it. A sweep stops too.
        signum = getattr(signal, summary["interrupted"], signal.SIGINT)
        sys.exit(128 + int(signum))


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg) -> None:
    hydra_config = HydraConfig.get()
    sweep = hydra_config.mode == RunMode.MULTIRUN
    overrides = " ".join(hydra_config.overrides.task) or "(no overrides)"
    if sweep:
        JOBS_RUN[0] += 1
        print(f"job {hydra_config.job.num}: {overrides}", file=sys.stderr, flush=True)
    try:
        _launch(cfg)
        if sweep:
            FINISHED_JOBS.append((hydra_config.job.num, list(hydra_config.overrides.task),
                                  Path(hydra_config.runtime.output_dir)))
    except JobFailed as failure:
        print(f"error: {failure}", file=sys.stderr, flush=True)
        if not sweep:
            sys.exit(2)
        FAILED_JOBS.append((hydra_config.job.num, overrides, str(failure).splitlines()[0]))


def sweep_table(jobs) -> str:
    """The finished jobs of a sweep side by side (``trainer.plot_metrics``'s table), each named by
    its number and the overrides that set it apart from the others."""
    shared = set.intersection(*(set(overrides) for _, overrides, _ in jobs))
    rows = {f"{number}: " + " ".join(o for o in overrides if o not in shared):
            summarize(read_metrics(run_dir)) for number, overrides, run_dir in jobs}
    return "sweep: the finished jobs\n" + format_table(rows)


def _quoting_hint(arguments: list[str]) -> str | None:
    """A path override starting with ~ fails in Hydra's lexer (the shell leaves ``key=~/...``
    alone), and Hydra's message only points at the character: say how to write it."""
    for argument in arguments:
        key, equals, value = argument.partition("=")
        if equals and value.startswith("~"):
            return (f"hint: Hydra reads an unquoted ~ as an error; write {key}='\"{value}\"' (the ~ "
                    "is expanded) or the full path")
    return None


def entry_point():
    try:
        main()
    except SystemExit as exit:
        # Hydra reports a config it cannot compose (unknown group option, bad override syntax) in
        # a short message and exits 1; a user error exits 2 here, as every other one does.
        if exit.code == 1:
            hint = _quoting_hint(sys.argv[1:])
            if hint:
                print(hint, file=sys.stderr)
            sys.exit(2)
        raise
    if len(FINISHED_JOBS) > 1:
        print(sweep_table(FINISHED_JOBS), file=sys.stderr)
    if FAILED_JOBS:
        print(f"sweep: {len(FAILED_JOBS)} of {JOBS_RUN[0]} jobs failed:", file=sys.stderr)
        for number, overrides, message in FAILED_JOBS:
            print(f"  job {number} ({overrides}): {message}", file=sys.stderr)
        sys.exit(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker whose run finished (outputs written, process group left) exits without
        # interpreter finalization. There, objects that still reference gloo's threads and work
        # items are torn down in no set order, which now and then aborted a finished process
        # ("terminate called without an active exception", exit -6; pytorch/pytorch#179291).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    entry_point()
