"""The evaluator protocol the engine calls (reset, update per batch, compute), and its cross-rank helpers.

hat.engine is imported inside the helpers only: hat.engine.trainer imports this package."""
from __future__ import annotations

import abc
from typing import Any

import torch


class Evaluator(abc.ABC):
    """Accumulates one validation pass batch by batch; compute() gives the whole set's numbers on every rank."""

    main_metric: str = ""  # the key of compute() that checkpoint selection uses by default; higher is better

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything seen: call before each validation pass."""

    @abc.abstractmethod
    def update(self, predictions: Any, targets: Any) -> None:
        """Add one batch (tensors on any device)."""

    @abc.abstractmethod
    def compute(self) -> dict[str, float]:
        """The metrics over everything since reset(), over all ranks; every rank must call it together."""


def sum_over_ranks(counts: torch.Tensor) -> torch.Tensor:
    """`counts` (a CPU tensor) summed element-wise over every rank of the process group; alone, itself."""
    from hat.engine import distributed

    if not distributed.active():
        return counts
    total = distributed.all_reduce_sum(counts.flatten().tolist())
    return torch.tensor(total, dtype=torch.float64).round().to(counts.dtype).reshape(counts.shape)


def gather_over_ranks(items: list) -> list:
    """Every rank's `items` (picklable) concatenated in rank order, on every rank; alone, `items`."""
    from hat.engine import distributed

    if not distributed.active():
        return items
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, items)
    return [item for part in parts for item in part]
