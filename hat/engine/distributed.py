"""Multi-process training under torchrun: the process group, this process's place in it, and the few collectives
the engine needs (flags, sums, DDP wrapping). Alone (no torchrun, or WORLD_SIZE=1) every helper is a no-op."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from hat.engine.runtime import select_device
from hat.engine.sync_bn import convert_sync_batchnorm
from hat.errors import ConfigError

log = logging.getLogger("hat")
PEER_FAILURE_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting",
                      "NCCL communicator was aborted", "Socket Timeout")


@dataclasses.dataclass(frozen=True)
class World:
    """Where this process stands: its global rank, the number of processes, its rank on this machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, TensorBoard, configs and progress."""
        return self.rank == 0


def world() -> World:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process when they are absent."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ConfigError("RANK/WORLD_SIZE/LOCAL_RANK must be integers: launch with torchrun, which sets "
                          "them") from None


def setup(device_name: str, timeout_s: float) -> torch.device:
    """Join the process group (once per process) and return this rank's device.

    CUDA (one GPU per local rank) with NCCL when the device is CUDA, else the CPU with gloo. A collective that
    waits longer than `timeout_s` for another rank fails instead of hanging."""
    w = world()
    device = select_device(device_name)
    if w.size == 1:
        return device
    if device.type == "cuda":
        if w.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {w.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                              f"launch at most that many processes per node (torchrun --nproc_per_node)")
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("process group: %d processes, backend %s, this is rank %d (local %d) on %s",
                 w.size, backend, w.rank, w.local_rank, device)
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def ranks_where(flag: bool) -> list[int]:
    """The ranks on which `flag` holds. Every rank must call this at the same point: it is how ranks agree to skip
    or stop a step together (one rank leaving a step alone would leave the others waiting in its all-reduce)."""
    if not active():
        return [0] if flag else []
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=_comm_device())
    flags[dist.get_rank()] = int(flag)
    dist.all_reduce(flags)
    return flags.nonzero().flatten().tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over every rank (float64), e.g. correct/count pairs of a sharded evaluation."""
    if not active():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(total)
    return total.tolist()


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics move with each rank's own batches), so all
    ranks evaluate the model rank 0 saves."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def barrier() -> None:
    if active():
        dist.barrier()


def wrap_model(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """DistributedDataParallel around `model` (batch norms synchronized across ranks when `sync_bn`); alone,
    the model itself. Parameters stay the same objects, so an optimizer built before still holds them."""
    if not active():
        return model
    if sync_bn:
        convert_sync_batchnorm(model)
    device_ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def peer_failure_message(exc: BaseException) -> Optional[str]:
    """What to tell the user when a collective failed because another rank died or stopped answering; None for
    any other error."""
    text = " ".join(str(exc).split())
    lost = isinstance(exc, dist.DistError) or any(s in text for s in PEER_FAILURE_SIGNS)
    if not lost:
        return None
    reason = text.split(". ")[0][:300]
    return (f"lost contact with another process of the job ({reason}). Another rank failed or was killed: torchrun's "
            f"summary on that rank's machine names it (Root Cause ... rank). The last checkpoint (last.pt) is intact: "
            f"fix the cause and continue with --resume")
