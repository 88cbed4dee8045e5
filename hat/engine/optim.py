"""Optimizers and per-step LR schedules (with linear warmup) that configs can name."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from hat.registry import register


@register(kind="optimizer")
def SGD(params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
        nesterov: bool = False) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


@register(kind="optimizer")
def AdamW(params: Iterable, lr: float, betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 0.01,
          eps: float = 1e-8) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)


def _with_warmup(schedule: Callable[[int], float], warmup_steps: int) -> Callable[[int], float]:
    """Scale the LR linearly from 1/warmup_steps to 1 over the first `warmup_steps` steps."""
    if warmup_steps <= 0:
        return schedule
    return lambda step: schedule(step) * min(1.0, (step + 1) / warmup_steps)


@register(kind="scheduler")
def CosineLR(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0,
             min_lr_ratio: float = 0.0) -> LRScheduler:
    """Cosine from the optimizer's LR to `min_lr_ratio` x LR over the whole run, stepped every optimizer step."""
    total, warmup = epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        progress = min(1.0, max(0, step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, _with_warmup(factor, warmup))


@register(kind="scheduler")
def StepLR(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int, milestones: Sequence[int] = (30,),
           gamma: float = 0.1, warmup_epochs: float = 0) -> LRScheduler:
    """Multiply the LR by `gamma` at each milestone epoch."""
    bounds = [m * steps_per_epoch for m in milestones]
    factor = lambda step: gamma ** sum(step >= b for b in bounds)  # noqa: E731
    return LambdaLR(optimizer, _with_warmup(factor, int(warmup_epochs * steps_per_epoch)))


@register(kind="scheduler")
def ConstantLR(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int,
               warmup_epochs: float = 0) -> LRScheduler:
    return LambdaLR(optimizer, _with_warmup(lambda step: 1.0, int(warmup_epochs * steps_per_epoch)))


@register(kind="scheduler")
def OneCycleLR(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int, pct_start: float = 0.3,
               div_factor: float = 25.0, final_div_factor: float = 1e4) -> LRScheduler:
    """PyTorch's OneCycle with the optimizer's LR as the peak (it cycles momentum too)."""
    peak = [group["lr"] for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                               pct_start=pct_start, div_factor=div_factor,
                                               final_div_factor=final_div_factor)
