"""A run that runs out of GPU memory stops with one screen saying where, with what batch and
memory, and which settings would fit, instead of PyTorch's allocator report under a traceback."""

import contextlib

import torch

from models.attention import resolve as resolve_attention

from .checkpoint import CheckpointError, latest_checkpoint


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message names the step and what to change."""


@contextlib.contextmanager
def explained(trainer, where: str):
    """Turn ``torch.OutOfMemoryError`` inside the block into ``OutOfMemory`` with the run's
    settings and remedies (the original error stays chained, for HYDRA_FULL_ERROR=1). ``where``:
    what the block does, e.g. "training step 12"."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        raise OutOfMemory(message(trainer, where, error)) from error


def message(trainer, where: str, error: BaseException) -> str:
    config = trainer.config
    batch = config.trainer.micro_batch_size
    accumulation = config.trainer.grad_accum
    attention = resolve_attention(trainer.model.config.attention, trainer.device)
    lines = [f"out of GPU memory in {where} ({config.model.name}, {batch} sequences "
             f"x {config.data.seqlen} tokens per micro-batch, {trainer.precision}, {attention} attention"
             f"{', blocks checkpointed' if config.model.checkpoint_blocks else ''})."]
    if trainer.device.type == "cuda":
        total = torch.cuda.get_device_properties(trainer.device).total_memory
        peak = torch.cuda.max_memory_allocated(trainer.device)
        lines.append(f"Peak {peak / 2**30:.1f} GiB of the card's {total / 2**30:.1f} GiB held by tensors.")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if first_line:
        lines.append(f"PyTorch: {first_line[:200]}")
    remedies = []
    if batch > 1:
        remedies.append(f"trainer.micro_batch_size={batch // 2} trainer.grad_accum={accumulation * 2} "
                        "(the same batch in smaller micro-batches; a new run, as a resume keeps the batch layout)")
    if not config.model.checkpoint_blocks:
        remedies.append("model.checkpoint_blocks=true (each block's activations recomputed in the "
                        "backward; a resume may turn it on)")
    if attention == "eager":
        remedies.append("model.attention=flash (attention memory linear in the context, not quadratic)")
    if remedies:
        lines.append("To fit, try:\n  " + "\n  ".join(remedies))
    with contextlib.suppress(CheckpointError):      # the pointer's own problem is not this one
        checkpoint = latest_checkpoint(trainer.run_dir)
        if checkpoint is not None:
            lines.append(f"The run's last checkpoint is {checkpoint}; resume=true continues from it.")
    return "\n".join(lines)
