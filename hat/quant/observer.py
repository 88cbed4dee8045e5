"""Observers: record the range of what flows through them and turn it into a symmetric scale.

scale = max(|min|, |max|) / ((qmax - qmin) / 2), zero point 0 (J5_ARITHMETIC.md). `ch_axis=None` is
per-tensor; an int is per-channel along that axis (weights: 0).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from hat.integer.profile import qrange, scale_divisor

EPS = torch.finfo(torch.float32).eps


def channel_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (axis 0) min and max as float. amin + amax: torch.aminmax(dim=1) is ~20x slower on CPU."""
    flat = x.reshape(x.shape[0], -1)
    return _float(flat.amin(1)), _float(flat.amax(1))


def _float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


class MinMaxObserver(nn.Module):
    """Running min and max over everything observed. With `sync_ranks` (see `synchronized_observers`), each
    batch's range is first reduced over every rank, so all ranks hold the range of the global batch."""

    sync_ranks = False

    def __init__(self, dtype: str = "qint8", ch_axis: Optional[int] = None):
        super().__init__()
        self.dtype, self.ch_axis = dtype, ch_axis
        qrange(dtype)  # validates the dtype
        self.register_buffer("min_val", torch.tensor([]))
        self.register_buffer("max_val", torch.tensor([]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.update_range(*self._batch_range(x.detach()))
        return x

    def update_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Take in one batch's min and max (shape [1] per tensor, [C] per channel)."""
        if self.sync_ranks and dist.is_initialized():  # one collective: max(hi) = -min(-hi), exactly
            both = torch.cat([lo, -hi])
            dist.all_reduce(both, dist.ReduceOp.MIN)
            lo, hi = both[:len(lo)], -both[len(lo):]
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = lo, hi
        else:
            self._update(lo, hi)

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:  # in place: an observer runs every step
        torch.minimum(self.min_val, lo, out=self.min_val)
        torch.maximum(self.max_val, hi, out=self.max_val)

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ch_axis is None:
            lo, hi = torch.aminmax(x)
            return _float(lo.view(1)), _float(hi.view(1))
        return channel_range(x.transpose(0, self.ch_axis))

    @property
    def observed(self) -> bool:
        return self.min_val.numel() > 0

    def calculate_scale(self) -> torch.Tensor:
        """Symmetric scale per tensor (shape [1]) or per channel (shape [C]); 1.0 before anything was seen."""
        if not self.observed:
            return torch.ones(1, device=self.min_val.device)
        amax = torch.maximum(self.min_val.abs(), self.max_val.abs())
        return amax.div_(scale_divisor(self.dtype)).clamp_(min=EPS)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("min_val", "max_val"):  # empty until observed: take the saved size
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"min_val={self.min_val}, max_val={self.max_val}"


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max (`averaging_constant` = weight of the new batch)."""

    def __init__(self, dtype: str = "qint8", ch_axis: Optional[int] = None, averaging_constant: float = 0.01):
        super().__init__(dtype, ch_axis)
        self.averaging_constant = averaging_constant

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.min_val.lerp_(lo, self.averaging_constant)  # min + c * (lo - min), in place
        self.max_val.lerp_(hi, self.averaging_constant)


class PerChannelMinMaxObserver(MinMaxObserver):
    def __init__(self, dtype: str = "qint8", ch_axis: int = 0):
        super().__init__(dtype, ch_axis)


class MovingAveragePerChannelMinMaxObserver(MovingAverageMinMaxObserver):
    def __init__(self, dtype: str = "qint8", ch_axis: int = 0, averaging_constant: float = 0.01):
        super().__init__(dtype, ch_axis, averaging_constant)


@contextlib.contextmanager
def synchronized_observers(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, every activation observer of `model` reduces each batch's range over all ranks of the
    process group: the ranks end with identical ranges, those of one process seeing all ranks' batches. Every rank
    must run the same forwards (each observer call is a collective). Weight observers are left alone: every rank
    holds the same weights."""
    weights = {id(m) for owner in model.modules() if isinstance(getattr(owner, "weight_fake_quant", None), nn.Module)
               for m in owner.weight_fake_quant.modules()}
    observers = [m for m in model.modules() if isinstance(m, MinMaxObserver) and id(m) not in weights]
    observers = observers if enabled else []
    for observer in observers:
        observer.sync_ranks = True
    try:
        yield model
    finally:
        for observer in observers:
            observer.sync_ranks = False
