"""Metrics: one JSON object per line in metrics.jsonl, the train.log, and Weights & Biases."""

import json
import logging
import os
import uuid
from pathlib import Path

from .config import LoggerConfig
from .console import ConsoleHandler

log = logging.getLogger("flashtrain")

def setup_logging(run_dir: Path, is_main: bool):
    """train.log in the run directory (rank 0) and the console; idempotent."""
    log.setLevel(logging.INFO)
    log.propagate = False
    if not is_main or any(getattr(h, "_flashtrain", False) for h in log.handlers):
        return
    file_handler = logging.FileHandler(Path(run_dir) / "train.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = ConsoleHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    for handler in (file_handler, console):
        handler._flashtrain = True
        log.addHandler(handler)


def close_logging():
    for handler in [h for h in log.handlers if getattr(h, "_flashtrain", False)]:
        handler.close()
        log.removeHandler(handler)


class MetricsWriter:
    def __init__(self, run_dir: Path, config: LoggerConfig, run_config: dict, is_main: bool):
        self.is_main = is_main
        self.file = open(Path(run_dir) / "metrics.jsonl", "a") if is_main else None
        self.wandb = None
        if is_main and config.kind == "wandb":
            import wandb
            id_file = Path(run_dir) / "wandb_id"
            # A stable id per run directory, so a resumed run continues the same wandb run.
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=config.project, name=config.name, id=run_id, resume="allow",
                                    dir=str(run_dir), config=run_config,
                                    mode=os.environ.get("WANDB_MODE", config.mode))
            # A resume replays the steps after its checkpoint. A wandb run's history only moves
            # forward (an earlier step is dropped with a warning), so the replayed steps it already
            # has keep their first values there; metrics.jsonl holds both.
            self.wandb_logged_through = _last_step(Path(run_dir) / "metrics.jsonl")

    def write(self, record: dict):
        if not self.is_main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None and "event" not in record and record["step"] > self.wandb_logged_through:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and v is not None},
                           step=record["step"])

    def write_summary(self, summary: dict):
        """The whole run's summary (``trainer.run_summary.summarize``: best validation perplexity
        and its step, median throughput, ...) as the wandb run's summary, under ``summary/``."""
        if self.wandb is not None:
            self.wandb.summary.update({f"summary/{k}": v for k, v in summary.items() if v is not None})

    def flush(self):
        if self.file:
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _last_step(path: Path) -> int:
    """The highest step of a metrics.jsonl (-1 for none; a partial last line is skipped)."""
    last = -1
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                last = max(last, int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue
    return last


def read_metrics(run_dir) -> dict:
    """A run's ``metrics.jsonl`` as {"train": [...], "eval": [...], "events": [...]}, each by step.

    A resumed run replays the steps after its checkpoint, so a step can appear twice; the later
    line is the one that led to the current state, so the last occurrence of each step wins. Event
    lines (``{"event": "resume" | "interrupted", "step": ...}``) are kept in file order.
    """
    path = Path(run_dir) / "metrics.jsonl"
    train, evals, events = {}, {}, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number}: not a JSON line (a run killed mid-write leaves at "
                             f"most a partial last line): {line[:80]!r}") from None
        if "event" in record:
            events.append(record)
        elif "val_loss" in record:
            evals[record["step"]] = record
        elif "loss" in record:
            train[record["step"]] = record
    ordered = lambda table: [table[step] for step in sorted(table)]
    return {"train": ordered(train), "eval": ordered(evals), "events": events}
