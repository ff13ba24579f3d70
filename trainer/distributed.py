"""torch.distributed for runs launched with torchrun: the process group, DDP or FSDP2 wrapping,
gradient sync between micro-batches, and gathering a sharded model's full weights."""

import contextlib
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


def wrap_model(model, context: DistributedContext, device: torch.device, strategy: str = "ddp",
               param_dtype: torch.dtype | None = None):
    """Data parallelism over the ranks: DistributedDataParallel around the model, or FSDP2, which
    shards the model in place (each block is one unit of all-gather and reduce-scatter, the root
    holds the embeddings and the tied head). FSDP must be applied before the optimizer is built:
    it replaces the parameters with sharded DTensors."""
    if not context.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) \
            if param_dtype is not None else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel
    # The models' buffers are constants made from the config (the rotary frequencies), equal on
    # every rank: no broadcast before each forward.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def gradient_sync(wrapped, context: DistributedContext, strategy: str, sync: bool):
    """A context in which backward does (or, between micro-batches, does not) reduce gradients."""
    if not context.enabled or sync and strategy == "ddp":
        return contextlib.nullcontext()
    if strategy == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return wrapped.no_sync()


def full_model_state(model, strategy: str, context: DistributedContext) -> dict:
    """The whole model's state dict on rank 0 (CPU tensors) and {} elsewhere; a collective under FSDP."""
    if not (context.enabled and strategy == "fsdp"):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_value(tensor):
    """A DTensor (FSDP's gradient norm) as a plain tensor with its full value."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def shutdown(context: DistributedContext, finished: bool = False):
    """Leave the process group. After a finished run every rank first waits for the others: gloo
    tears a rank's connections down while a peer may still be sending to it, which now and then
    aborted a process that had finished ("terminate called without an active exception"). Not after
    a failure: a rank that waited there while another sat in a different collective would hang
    instead of failing, which torchrun notices and ends."""
    if context.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
