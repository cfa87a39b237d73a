"""What the callbacks that change parameter shapes need from Lightning's strategy under DDP.

A collection (or any surgery) slices parameters in place, on every rank alike. DDP's reducer, though,
holds gradient buckets laid out for the shapes it wrapped, so after a surgery the DDP wrapper is rebuilt
over the smaller parameters (:func:`rewrap_ddp`): the ``nn.Parameter`` objects, hence the optimizer and its
state, stay as they are. Strategies that shard parameters (FSDP, DeepSpeed, model parallelism) cannot be
sliced like this and are refused by name (:func:`check_strategy`).
"""

from __future__ import annotations

import gc
import logging

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


def check_strategy(who: str, trainer: L.Trainer) -> None:
    """Refuse, before training, a strategy whose parameters a surgery cannot slice.

    Args:
        who: the callback, named in the message.
        trainer: the trainer about to fit.

    Raises:
        ValueError: for anything but a single device or DDP (``ddp``, ``ddp_spawn``, ``ddp_find_unused_*``),
            and for ``sync_batchnorm``.
    """
    strategy = trainer.strategy
    if getattr(strategy, "_layer_sync", None) is not None:
        raise ValueError(
            f"{who}: sync_batchnorm replaces every BatchNorm with a torch SyncBatchNorm, dropping the "
            "channel gates (GatedBatchNorm2d) that pruning and collection work through; train without it "
            "(each rank then normalises with its own batch statistics)"
        )
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return
    raise ValueError(
        f"{who} changes parameter shapes during training, which works on one device or under DDP "
        f"(strategy 'ddp', 'ddp_spawn', 'ddp_find_unused_parameters_true'); got {type(strategy).__name__}: "
        "FSDP, DeepSpeed and model-parallel strategies shard the parameters and are not supported"
    )


def is_ddp(trainer: L.Trainer) -> bool:
    """Whether the model is wrapped in DDP (a fit on more than one process)."""
    return isinstance(trainer.strategy.model, DistributedDataParallel)


def release(wrapper: DistributedDataParallel) -> nn.Module:
    """Drop a DDP wrapper's reducer and return the module it wrapped, ready to be wrapped anew.

    The reducer holds the parameters' gradient accumulators, which remember the shapes it wrapped: after a
    surgery autograd would reject the new gradients while it lives, so it must be gone first.
    """
    module = wrapper.module
    del wrapper.reducer
    gc.collect()
    return module


def rewrap_ddp(trainer: L.Trainer, find_unused_parameters: bool | None = None) -> bool:
    """Rebuild the DDP wrapper over the module's current parameters (after a surgery changed their shapes).

    Every rank must call it, after the identical surgery: DDP's constructor checks that the parameter
    shapes agree across ranks (a clear error otherwise) and broadcasts rank 0's parameters and buffers.
    The parameters are the same objects, so the optimizer and its state are kept.

    Args:
        trainer: the fitting trainer.
        find_unused_parameters: a new value for DDP's flag (kept by later rebuilds); ``None`` keeps it.

    Returns:
        Whether there was a DDP wrapper to rebuild.
    """
    strategy = trainer.strategy
    old = strategy.model
    if not isinstance(old, DistributedDataParallel) or not isinstance(strategy, DDPStrategy):
        return False
    if find_unused_parameters is not None:
        strategy._ddp_kwargs["find_unused_parameters"] = find_unused_parameters
    strategy.model = old.module  # the strategy's reference to the old wrapper goes too
    module = release(old)
    del old
    strategy.model = strategy._setup_model(module)
    strategy._register_ddp_hooks()
    log.debug("DDP rebuilt (find_unused_parameters=%s)", strategy.model.find_unused_parameters)
    return True


def _flat(tensors: list[Tensor]) -> Tensor:
    """One float64 vector on the first tensor's device (the collective's: NCCL's are CUDA tensors)."""
    device = tensors[0].device
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors])


def _pieces(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """``flat`` cut back into tensors of ``like``'s shapes and dtypes."""
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view_as(t).to(t.dtype))
        offset += t.numel()
    return out


def sum_over_ranks(tensors: list[Tensor]) -> list[Tensor]:
    """The elementwise sums over the process group of ``tensors``, in one collective (float64 inside)."""
    if not tensors or not dist.is_initialized():
        return tensors
    flat = _flat(tensors)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return _pieces(flat, tensors)


def all_reduce_sum(trainer: L.Trainer, tensors: list[Tensor]) -> list[Tensor]:
    """:func:`sum_over_ranks` under DDP; the tensors themselves on one process."""
    return sum_over_ranks(tensors) if is_ddp(trainer) else tensors


def broadcast_tensors(trainer: L.Trainer, tensors: list[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values, in one collective (no-op on one process).

    For decisions that must agree bit for bit on every rank (which switch dies): each rank computes them
    from values that DDP keeps identical, and rank ``src``'s copy is made the truth.
    """
    if not is_ddp(trainer) or not tensors or not dist.is_initialized():
        return
    flat = _flat(tensors)
    dist.broadcast(flat, src=src)
    for t, piece in zip(tensors, _pieces(flat, tensors)):
        t.data.copy_(piece)
