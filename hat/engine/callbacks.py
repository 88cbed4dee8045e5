"""The standard callbacks: evaluation, checkpoints, TensorBoard scalars, progress bar and epoch log line."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch
from torch.utils.data import DataLoader

from hat.checkpoint import save_checkpoint
from hat.engine import distributed
from hat.engine.nonfinite import NonFiniteError, non_finite_message, non_finite_weights
from hat.engine.trainer import Callback, Trainer, evaluate
from hat.errors import ConfigError
from hat.evaluation import Evaluator

log = logging.getLogger("hat")


class EvalCallback(Callback):
    """Evaluates every `interval` epochs and after the last one; results land in `trainer.metrics`.

    `context` wraps each evaluation (the QAT stage freezes observers there)."""

    def __init__(self, loader: DataLoader, interval: int = 1,
                 context: Callable[[], ContextManager] = contextlib.nullcontext, evaluator: Optional[Evaluator] = None):
        self.loader, self.interval, self.context, self.evaluator = loader, interval, context, evaluator

    def before_epoch(self, trainer: Trainer) -> None:
        trainer.metrics = {}  # an epoch without evaluation reports no metrics, never the previous ones

    def after_epoch(self, trainer: Trainer) -> None:
        if trainer.epoch % self.interval == 0 or trainer.epoch == trainer.epochs or trainer.should_stop:
            distributed.broadcast_buffers(trainer.bare_model)
            with self.context():  # the bare model: DDP's forward syncs buffers, and shards may differ in batches
                trainer.metrics = evaluate(trainer.bare_model, self.loader, trainer.device, self.evaluator)


class CheckpointCallback(Callback):
    """Writes `last.pt` every epoch and `best.pt` when `metric` improves (`mode` max: higher is better, min: lower);
    keeps the best epoch's number and metrics (`best_epoch`, `best_metrics`), which the stage reports."""

    def __init__(self, out_dir: str | Path, config_yaml: str, metric: str = "val/top1", mode: str = "max"):
        if mode not in ("max", "min"):
            raise ConfigError(f"trainer.best_mode must be max or min, got '{mode}'")
        self.out_dir, self.config_yaml, self.metric, self.mode = Path(out_dir), config_yaml, metric, mode
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.best_metrics: dict[str, float] = {}

    def after_epoch(self, trainer: Trainer) -> None:
        broken = non_finite_weights(trainer.bare_model)
        if broken:  # never replace a good checkpoint with a broken one
            last = self.out_dir / "last.pt"
            kept = (f"{last} keeps the previous epoch" if last.is_file() else
                    "no checkpoint of this run exists yet (the weights broke before its first epoch ended)")
            raise NonFiniteError(f"refusing to write a checkpoint: non-finite values in {', '.join(broken[:5])}; "
                                 f"{kept}. "
                                 + non_finite_message("weights", trainer.epoch - 1, trainer.step - 1).split(". ", 1)[1])
        value = trainer.metrics.get(self.metric)
        if value is None and trainer.metrics:
            raise ConfigError(f"trainer.best_metric: '{self.metric}' is not among the validation metrics "
                              f"({', '.join(trainer.metrics)}); set trainer.best_metric to one of them")
        better = (lambda a, b: a > b) if self.mode == "max" else (lambda a, b: a < b)
        improved = value is not None and (self.best is None or better(value, self.best))
        if improved:
            self.best, self.best_epoch, self.best_metrics = value, trainer.epoch, dict(trainer.metrics)
        state = {**trainer.state_dict(), "config": self.config_yaml, "metrics": dict(trainer.metrics),
                 "best_metric": self.best, "best_epoch": self.best_epoch, "best_metrics": self.best_metrics}
        save_checkpoint(state, self.out_dir / "last.pt")
        if improved:
            save_checkpoint(state, self.out_dir / "best.pt")

    def load_state(self, state: dict) -> None:
        """Resume: the best so far, from a checkpoint this callback wrote."""
        self.best, self.best_epoch = state.get("best_metric"), state.get("best_epoch")
        self.best_metrics = dict(state.get("best_metrics") or {})

    def report(self) -> dict[str, float]:
        """The best epoch's metrics as `best/<key>` and its number as `best/epoch`: what best.pt holds."""
        if self.best_epoch is None:
            return {}
        return {**{f"best/{k}": v for k, v in self.best_metrics.items()}, "best/epoch": float(self.best_epoch)}


class TensorBoardCallback(Callback):
    """Scalars under `log_dir`: train/loss (and each term of a loss dict), train/lr, train/grad_norm,
    train/images_per_sec (all ranks) and eval metrics; `notes` (e.g. how the LR was scaled) as text; after each
    evaluation the images `preview(trainer)` draws (a detector's boxes, a segmentor's masks) as val/predictions; at
    the end `hparams(writer, metrics)` (the run's settings with its last metrics); every `histogram_interval` epochs
    `histograms(writer, trainer)` (weights, quantizer scales)."""

    def __init__(self, log_dir: str | Path, log_interval: int = 10, notes: Optional[dict[str, str]] = None,
                 preview: Optional[Callable[[Trainer], Optional[torch.Tensor]]] = None,
                 hparams: Optional[Callable[[Any, dict], None]] = None,
                 histograms: Optional[Callable[[Any, Trainer], None]] = None, histogram_interval: int = 0):
        self.log_dir, self.log_interval, self.notes = Path(log_dir), max(1, log_interval), dict(notes or {})
        self.preview, self.hparams = preview, hparams
        self.histograms, self.histogram_interval = histograms, histogram_interval
        self.writer = None

    def before_train(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.log_dir))
        for tag, text in self.notes.items():
            self.writer.add_text(tag, text, trainer.step)
        log.info("TensorBoard: tensorboard --logdir %s", self.log_dir)
        self._mark(trainer)

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step % self.log_interval:
            return
        now = time.perf_counter()
        scalars = {"train/loss": float(trainer.loss), "train/lr": trainer.lr,
                   "train/images_per_sec": (trainer.images_seen - self.seen) / max(now - self.time, 1e-9)}
        if trainer.grad_norm is not None:
            scalars["train/grad_norm"] = trainer.grad_norm
        scalars.update({f"train/{name}": value for name, value in trainer.loss_terms.items()})
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, trainer.step)
        self._mark(trainer)

    def after_epoch(self, trainer: Trainer) -> None:
        for tag, value in trainer.metrics.items():
            self.writer.add_scalar(tag, value, trainer.step)
        drawn = self.preview(trainer) if self.preview is not None and trainer.metrics else None
        if drawn is not None:
            self.writer.add_images("val/predictions", drawn, trainer.step)
        if self.histograms is not None and self.histogram_interval > 0 and trainer.epoch % self.histogram_interval == 0:
            self.histograms(self.writer, trainer)
        self.writer.flush()
        self._mark(trainer)  # evaluation time is not training throughput

    def after_train(self, trainer: Trainer) -> None:
        if self.hparams is not None and trainer.metrics:
            self.hparams(self.writer, trainer.metrics)
        self.writer.close()

    def _mark(self, trainer: Trainer) -> None:
        self.time, self.seen = time.perf_counter(), trainer.images_seen


class ProgressCallback(Callback):
    """A tqdm bar per epoch (loss, lr, images/s) when `bar`, and one log line per epoch always, ending with the
    time the stage still needs (its epochs so far, evaluation included, times the epochs left)."""

    def __init__(self, bar: bool = True, refresh_every: int = 5):
        self.bar_enabled, self.refresh_every = bar, refresh_every
        self.bar = None
        self.first: Optional[tuple[float, int]] = None  # (time, epoch) when this run's first epoch began

    def before_epoch(self, trainer: Trainer) -> None:
        self.start = self.last_step = time.perf_counter()
        self.first = self.first or (self.start, trainer.epoch)
        self.seen = trainer.images_seen
        if self.bar_enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.steps_per_epoch, desc=f"epoch {trainer.epoch + 1}/{trainer.epochs}",
                            leave=False)

    def after_step(self, trainer: Trainer) -> None:
        self.last_step = time.perf_counter()
        if self.bar is None:
            return
        self.bar.update(1)
        if trainer.step % self.refresh_every == 0:
            self.bar.set_postfix(loss=f"{float(trainer.loss):.4f}", lr=f"{trainer.lr:.3g}",
                                 img_s=f"{self._throughput(trainer, time.perf_counter()):.0f}", refresh=False)

    def after_epoch(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
        metrics = " ".join(f"{k} {v:.4g}" for k, v in trainer.metrics.items())
        loss = float(trainer.loss) if trainer.loss is not None else float("nan")
        log.info("epoch %d/%d  step %d  loss %.4f  lr %.3g  %.0f img/s  %s%s", trainer.epoch, trainer.epochs,
                 trainer.step, loss, trainer.lr, self._throughput(trainer, self.last_step), metrics, self._eta(trainer))

    def _eta(self, trainer: Trainer) -> str:
        (started, first_epoch), left = self.first, trainer.epochs - trainer.epoch
        done = trainer.epoch - first_epoch
        if left <= 0 or done <= 0:
            return ""
        seconds = int((time.perf_counter() - started) / done * left)
        return f"  ETA {seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
            f"  ETA {seconds // 60}m{seconds % 60:02d}s"

    def _throughput(self, trainer: Trainer, now: float) -> float:
        return (trainer.images_seen - self.seen) / max(now - self.start, 1e-9)
