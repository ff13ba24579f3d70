"""``trainer.save_best``: the weights of the evaluation with the lowest validation loss so far, kept
in ``<run>/best_model.pt`` (a model file, which every tool reads) whatever ``keep_checkpoints``
has deleted since. Fine-tuning on a small corpus overfits before its last step; the final
``model.pt`` is then not the model to use."""

import math
from pathlib import Path

import torch

from models import save_model
from models.checkpoint import load_error_reason

from .checkpoint import CheckpointError
from .distributed import full_model_state
from .metrics import log

BEST_MODEL = "best_model.pt"


class BestModel:
    """The lowest validation loss of the run, and the weights that reached it. The file carries its
    step and loss, so a resumed run holds later evaluations to the same bar, even when the file
    was written after the checkpoint it resumed from (those weights did reach that loss). A run
    that starts afresh replaces whatever file an earlier run left there."""

    def __init__(self, run_dir: Path, enabled: bool, resuming: bool):
        self.path = Path(run_dir) / BEST_MODEL
        self.enabled = enabled
        self.loss, self.step = math.inf, None
        if enabled and resuming and self.path.exists():
            try:
                saved = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                self.loss, self.step = float(saved["val_loss"]), int(saved["step"])
            except Exception as error:   # truncated or foreign: say so before any training
                raise CheckpointError(f"{self.path} is not readable as a best model "
                                      f"({load_error_reason(error)}); move it away, or pass "
                                      "trainer.save_best=false") from None

    def after_evaluation(self, trainer, record: dict):
        """Write the weights if this evaluation beat every earlier one. Every process evaluates
        the same windows with the same weights; they still agree explicitly, since under FSDP
        gathering the weights is a collective that all must enter."""
        if not self.enabled:
            return
        if not trainer.context.any(record["val_loss"] < self.loss, trainer.device):
            return
        weights = full_model_state(trainer.model, trainer.config.trainer.distributed, trainer.context)
        self.loss, self.step = record["val_loss"], record["step"]
        if trainer.context.is_main:
            save_model(trainer.model, self.path, state_dict=weights,
                       metadata={"step": self.step, "val_loss": self.loss})
            log.info(f"step {self.step}: the lowest validation loss so far; weights in {self.path}")
