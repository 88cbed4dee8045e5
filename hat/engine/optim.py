"""Optimizers, per-step LR schedules (with linear warmup) that configs can name, and LR scaling with the global
batch."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from hat.errors import ConfigError
from hat.registry import build, register


def _require(ok: bool, message: str) -> None:
    """A value a schedule or optimizer cannot work with: the registry reports it with the config key."""
    if not ok:
        raise ValueError(message)


@register(kind="optimizer")
def SGD(params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
        nesterov: bool = False) -> torch.optim.SGD:
    _require(0 <= momentum < 1, f"momentum={momentum} must be in [0, 1)")
    _require(weight_decay >= 0, f"weight_decay={weight_decay} must be >= 0")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


@register(kind="optimizer")
def AdamW(params: Iterable, lr: float, betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 0.01,
          eps: float = 1e-8) -> torch.optim.AdamW:
    _require(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"betas={list(betas)} must be two numbers in [0, 1)")
    _require(weight_decay >= 0 and eps > 0, f"weight_decay={weight_decay} must be >= 0 and eps={eps} > 0")
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
    _require(0 <= min_lr_ratio <= 1, f"min_lr_ratio={min_lr_ratio} must be in [0, 1] (the final LR / the LR)")
    _require(warmup_epochs >= 0, f"warmup_epochs={warmup_epochs} must be >= 0")
    total, warmup = epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        progress = min(1.0, max(0, step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, _with_warmup(factor, warmup))


@register(kind="scheduler")
def StepLR(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int, milestones: Sequence[int] = (30,),
           gamma: float = 0.1, warmup_epochs: float = 0) -> LRScheduler:
    """Multiply the LR by `gamma` at each milestone epoch."""
    _require(gamma > 0, f"gamma={gamma} must be > 0 (the LR is multiplied by it at each milestone)")
    _require(all(m >= 0 for m in milestones), f"milestones={list(milestones)} must be epochs >= 0")
    _require(warmup_epochs >= 0, f"warmup_epochs={warmup_epochs} must be >= 0")
    bounds = [m * steps_per_epoch for m in milestones]
    factor = lambda step: gamma ** sum(step >= b for b in bounds)  # noqa: E731
    return LambdaLR(optimizer, _with_warmup(factor, int(warmup_epochs * steps_per_epoch)))


@register(kind="scheduler")
def ConstantLR(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int,
               warmup_epochs: float = 0) -> LRScheduler:
    _require(warmup_epochs >= 0, f"warmup_epochs={warmup_epochs} must be >= 0")
    return LambdaLR(optimizer, _with_warmup(lambda step: 1.0, int(warmup_epochs * steps_per_epoch)))


@register(kind="scheduler")
def OneCycleLR(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int, pct_start: float = 0.3,
               div_factor: float = 25.0, final_div_factor: float = 1e4) -> LRScheduler:
    """PyTorch's OneCycle with the optimizer's LR as the peak (it cycles momentum too)."""
    _require(0 < pct_start < 1, f"pct_start={pct_start} must be in (0, 1)")
    _require(div_factor > 0 and final_div_factor > 0, "div_factor and final_div_factor must be > 0")
    peak = [group["lr"] for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                               pct_start=pct_start, div_factor=div_factor,
                                               final_div_factor=final_div_factor)


LR_SCALING = ("linear", "sqrt", "none")
SCALING_KEYS = ("base_batch_size", "lr_scaling")  # optimizer keys the engine reads; the rest go to the optimizer


def scaled_lr(optimizer_cfg: Mapping, batch_per_device: int, world_size: int, accum_steps: int,
              samples_per_device: Optional[int] = None) -> tuple[float, str]:
    """FAQ 2.3 Q1: `optimizer.lr` is the LR for `optimizer.base_batch_size` samples per step; more devices or
    accumulation steps make each step see more, so the LR follows: x (global / base) for `linear`, its square root
    for `sqrt` (adaptive optimizers), unchanged for `none`. The batch is the one a step really sees: a batch or an
    accumulation larger than a device's share of the data (`samples_per_device`) delivers only that share.
    Returns the LR and a line saying how it was reached."""
    lr, base = optimizer_cfg.get("lr"), optimizer_cfg.get("base_batch_size")
    rule = optimizer_cfg.get("lr_scaling") or "linear"
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ConfigError(f"optimizer.lr={lr!r} must be a positive number (e.g. optimizer.lr=0.05)")
    if rule not in LR_SCALING:
        raise ConfigError(f"optimizer.lr_scaling: '{rule}' is not a rule; choose {', '.join(LR_SCALING)}")
    if base is not None and (isinstance(base, bool) or not isinstance(base, int) or base < 1):
        raise ConfigError(f"optimizer.base_batch_size={base!r} must be a positive integer (the batch optimizer.lr "
                          f"was tuned for), or null")
    batch, accum, notes = _delivered(batch_per_device, accum_steps, samples_per_device)
    global_batch = batch * world_size * accum
    how = f"global batch {global_batch} = {batch} per device x {world_size} processes x {accum} accumulation " \
          f"steps{notes}"
    if rule == "none":
        return lr, f"lr {lr:g} (optimizer.lr_scaling=none; {how})"
    if base is None:
        return lr, (f"lr {lr:g} unscaled: optimizer.base_batch_size is not set ({how}); set it to the batch "
                    f"optimizer.lr was tuned for, so the LR follows the global batch")
    factor = global_batch / base
    factor = factor if rule == "linear" else math.sqrt(factor)
    return lr * factor, (f"lr {lr * factor:g} = optimizer.lr {lr:g} x {factor:g} ({rule} scaling: {how}, "
                         f"optimizer.base_batch_size {base})")


def _delivered(batch: int, accum: int, samples: Optional[int]) -> tuple[int, int, str]:
    """(batch, accumulation steps) a step really sees when each device has `samples` training samples, and a note
    on what was capped."""
    if samples is None or samples >= batch * accum:
        return batch, accum, ""
    if samples < 1:
        raise ConfigError("the training set is empty: check data.train")
    notes = []
    if batch > samples:
        notes.append(f"data.batch_size {batch} is larger than the {samples} training samples per device, so a "
                     f"batch holds {samples}")
        batch = samples
    steps = math.ceil(samples / batch)
    if accum > steps:
        notes.append(f"trainer.accum_steps {accum} exceeds the {steps} batches of an epoch, so a step accumulates "
                     f"{steps}")
        accum = steps
    return batch, accum, f" ({'; '.join(notes)})" if notes else ""


def optimizer_arguments(optimizer_cfg: Mapping, lr: float) -> dict:
    """The optimizer's own config (`type` + its arguments) with the scaled `lr`, without the engine's keys."""
    return {**{k: v for k, v in optimizer_cfg.items() if k not in SCALING_KEYS}, "lr": lr}


def build_optimizer(cfg: Mapping, params: Iterable, world_size: int = 1,
                    samples_per_device: Optional[int] = None) -> tuple[torch.optim.Optimizer, str]:
    """The `optimizer:` section of a whole config built over `params`, its LR scaled to the global batch of
    `world_size` processes (data.batch_size each, trainer.accum_steps, capped by the `samples_per_device` each
    process trains on); also returns how the LR was reached."""
    if not isinstance(cfg.get("optimizer"), Mapping) or "type" not in cfg["optimizer"]:
        raise ConfigError("optimizer: missing; add `/optimizer: sgd` to the config's defaults or set optimizer.type")
    lr, line = scaled_lr(cfg["optimizer"], cfg["data"]["batch_size"], world_size, cfg["trainer"]["accum_steps"],
                         samples_per_device)
    return build(optimizer_arguments(cfg["optimizer"], lr), "optimizer", kind="optimizer", params=params), line
