"""torch.distributed setup for runs launched with torchrun (DDP today; the wrap is the FSDP2 seam)."""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool, device) -> bool:
        """True on every rank when ``flag`` is true on any (a collective: all ranks must call it)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def all_reduce_mean(self, tensor):
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.AVG if tensor.is_cuda else dist.ReduceOp.SUM)
            if not tensor.is_cuda:
                tensor /= self.world_size
        return tensor


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistributedContext(rank, world_size, local_rank)


def wrap_model(model, context: DistributedContext, device: torch.device):
    """Data parallelism over the ranks. FSDP2 (torch.distributed.fsdp.fully_shard) belongs here."""
    if not context.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shutdown(context: DistributedContext):
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
