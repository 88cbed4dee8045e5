"""The training loop: one readable `fit`, with callbacks at five named points.

before_train -> [before_epoch -> (train step -> after_step)* -> after_epoch]* -> after_train
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, ContextManager, Iterable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from hat.data import start_epoch
from hat.engine import distributed
from hat.engine.batch import loss_terms, to_device, total_loss
from hat.engine.nonfinite import NonFiniteError, non_finite_message
from hat.engine.runtime import rng_state, set_rng_state
from hat.errors import UsageError
from hat.evaluation import Accuracy, Evaluator

log = logging.getLogger("hat")


class Callback:
    """Override any of the five points; each gets the trainer, whose attributes hold the loop's state."""

    def before_train(self, trainer: "Trainer") -> None: ...
    def before_epoch(self, trainer: "Trainer") -> None: ...
    def after_step(self, trainer: "Trainer") -> None: ...
    def after_epoch(self, trainer: "Trainer") -> None: ...
    def after_train(self, trainer: "Trainer") -> None: ...


class Trainer:
    """Trains `model` (called as `model(images, targets) -> (loss, outputs)`, the loss a tensor or a dict of named
    terms that are summed) for `epochs` epochs.

    State callbacks read: `epoch` (epochs finished), `step` (optimizer steps done), `loss` (last step's total loss
    tensor), `loss_terms` (its named terms, when the model returns a loss dict), `grad_norm` (pre-clip total norm at
    logged or clipped steps, else None), `metrics` (latest eval), `should_stop` (set it to end after the current
    epoch).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train_loader: DataLoader, epochs: int,
                 scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
                 callbacks: Iterable[Callback] = (), device: torch.device | str = "cpu",
                 clip_grad_norm: Optional[float] = None, accum_steps: int = 1, amp: bool = False,
                 log_interval: int = 10, on_nonfinite: str = "stop"):
        _check_optimizer_holds(model, optimizer)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_loader, self.epochs, self.callbacks = train_loader, epochs, list(callbacks)
        self.device = torch.device(device)
        self.clip_grad_norm, self.accum_steps, self.log_interval = clip_grad_norm, accum_steps, log_interval
        amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if amp else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp and self.device.type == "cuda")
        self.epoch = self.step = 0
        self.loss: Optional[torch.Tensor] = None
        self.loss_terms: dict[str, float] = {}
        self.grad_norm: Optional[float] = None
        self.images_seen = 0  # over all ranks
        self.world_size = distributed.world().size
        self.metrics: dict[str, float] = {}
        self.should_stop = False
        self.on_nonfinite, self.skipped_steps = on_nonfinite, 0

    def fit(self) -> dict[str, float]:
        self._call("before_train")
        while self.epoch < self.epochs and not self.should_stop:
            start_epoch(self.train_loader, self.epoch)
            self.model.train()
            self._call("before_epoch")
            self.train_epoch()
            self.epoch += 1
            self._call("after_epoch")
        self._call("after_train")
        return self.metrics

    def train_epoch(self) -> None:
        batches = len(self.train_loader)
        group_loss, group_terms, poisoned = 0.0, {}, None
        for i, (images, targets) in enumerate(self.train_loader):
            images, targets = to_device((images, targets), self.device)
            group_start = i - i % self.accum_steps
            group = min(self.accum_steps, batches - group_start)  # the last group of an epoch may be short
            last_of_group = i + 1 == group_start + group
            # every rank takes the same branch: one rank skipping its backward would leave the others waiting
            bad = distributed.ranks_where(not math.isfinite(float(images.float().sum())))
            if bad:  # before forward: NaN must not reach BN statistics
                poisoned = poisoned or _on_ranks("input batch (NaN/Inf in the data)", bad)
            else:
                with self._gradient_sync(last_of_group):
                    with self.autocast():
                        terms, _ = self.model(images, targets)
                        loss = total_loss(terms)
                    bad = distributed.ranks_where(not math.isfinite(loss.item()))
                    if bad:
                        poisoned = poisoned or _on_ranks("loss", bad)
                    else:
                        self.scaler.scale(loss / group if group > 1 else loss).backward()
                        group_loss = group_loss + loss.detach() / group
                        for name, value in loss_terms(terms).items():
                            group_terms[name] = group_terms.get(name, 0.0) + value / group
            self.images_seen += len(images) * self.world_size
            if last_of_group:
                if poisoned is None:
                    self.loss, self.loss_terms = group_loss, group_terms
                    poisoned = self.optimizer_step()
                if poisoned is not None:
                    self._non_finite(poisoned)
                    poisoned = None
                else:
                    self._call("after_step")
                group_loss, group_terms = 0.0, {}

    def _gradient_sync(self, last_of_group: bool) -> ContextManager:
        """DDP all-reduces gradients once per optimizer step, at the last micro-batch of an accumulation group."""
        if last_of_group or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _non_finite(self, what: str) -> None:
        """Stop with the likely causes, or (on_nonfinite=skip) drop this step's gradients and go on."""
        message = non_finite_message(what, self.epoch, self.step)
        if self.on_nonfinite == "stop":
            raise NonFiniteError(message)
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        log.warning("skipped a step (%d so far): %s", self.skipped_steps, message.split(". Likely")[0])

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (micro-batches grouped by `accum_steps`)."""
        return math.ceil(len(self.train_loader) / self.accum_steps)

    def optimizer_step(self) -> Optional[str]:
        """Unscale, measure/clip the gradient norm, step, zero grads, advance the schedule.

        Returns "gradient" without stepping when the measured norm is not finite (measured when clipping and at
        log steps; a NaN gradient between them shows up as a NaN loss next step)."""
        self.scaler.unscale_(self.optimizer)
        self.grad_norm = None
        if self.clip_grad_norm is not None or (self.step + 1) % self.log_interval == 0:
            params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
            if self.clip_grad_norm is not None:
                self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm))
            else:
                self.grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
            if not math.isfinite(self.grad_norm) and not self.scaler.is_enabled():  # the scaler skips those itself
                return "gradient"
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        return None

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def bare_model(self) -> nn.Module:
        """The model without a DistributedDataParallel wrapper, for saving and evaluation."""
        return getattr(self.model, "module", self.model)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.bare_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step, "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken: weights, optimizer, schedule, counters, RNGs."""
        self.bare_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        set_rng_state(state["rng"])

    def _call(self, point: str) -> None:
        for callback in self.callbacks:
            getattr(callback, point)(self)


def _on_ranks(what: str, ranks: list[int]) -> str:
    """`what`, naming the ranks it happened on when several processes train."""
    if distributed.world().size == 1:
        return what
    return f"{what} on rank {', '.join(map(str, ranks))}"


def _check_optimizer_holds(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """FAQ 2.3 Q9: an optimizer built before prepare_qat holds the float model's parameters, so nothing trains."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if trainable and len(missing) == len(trainable):
        raise UsageError("the optimizer holds none of the model's trainable parameters, so no weight would "
                         "update. Was it built before prepare_qat (which returns a new model)? Build the optimizer "
                         "from the prepared model's parameters")
    if missing:
        log.warning("the optimizer does not hold %d trainable parameters (%s): they will not update",
                    len(missing), ", ".join(missing[:5]))


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
             evaluator: Optional[Evaluator] = None) -> dict[str, float]:
    """Mean loss and the evaluator's metrics (default: top-1 %) of `model(images, targets) -> (loss, outputs)` over
    `loader`; the evaluator sees `model.postprocess(outputs)` when the model has one (boxes after NMS, per-pixel
    classes). A loader sharded over ranks (ShardSampler) has its sums gathered: every rank returns the whole set's
    numbers."""
    evaluator = evaluator if evaluator is not None else Accuracy()
    evaluator.reset()
    postprocess = getattr(model, "postprocess", None)
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for images, targets in loader:
        images, targets = to_device((images, targets), device)
        loss, outputs = model(images, targets)
        loss_sum += float(total_loss(loss)) * len(images)
        count += len(images)
        evaluator.update(postprocess(outputs) if postprocess is not None else outputs, targets)
    model.train(was_training)
    if getattr(getattr(loader, "sampler", None), "num_replicas", 1) > 1:  # a shard: add the other ranks' shards
        loss_sum, count = distributed.all_reduce_sum([loss_sum, count])
    return {"val/loss": loss_sum / max(1, count), **evaluator.compute()}
