"""Stages: each takes the validated config, reads the previous stage's checkpoint, writes `work_dir/<stage>/`.

float -> calibration -> qat -> int_infer (see STAGE_ORDER). A stage is a registered function
`(cfg, out_dir, resume) -> metrics`; the quantization and backend work registers the later ones.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Callable, ContextManager, Optional, Sequence

import torch

from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from hat.checkpoint import load_checkpoint, load_pretrained
from hat.config import STAGE_ORDER, save_config, stage_config
from hat.data import build_dataset, build_loader
from hat.engine import distributed
from hat.engine.batch import to_device
from hat.engine.callbacks import CheckpointCallback, EvalCallback, ProgressCallback, TensorBoardCallback
from hat.engine.preview import preview
from hat.engine.stage_events import write_hparams, write_model_histograms
from hat.engine.runtime import keep_freed_memory, seed_everything
from hat.engine.workdir import claimed_stage_folder
from hat.engine.optim import build_optimizer
from hat.engine.trainer import Callback, Trainer
from hat.errors import CheckpointError, ConfigError
from hat.evaluation import Accuracy, Evaluator
from hat.fileio import atomic_write
from hat.models.zoo import report_pretrained
from hat.models.zoo_index import pretrained_path
from hat.registry import build, get, list_registered, register

log = logging.getLogger("hat")
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "step", "rng")


PREVIEW_IMAGES = 4  # validation images drawn with their predictions in TensorBoard (detectors, segmentors)
SINGLE_PROCESS_STAGES = ("int_infer",)  # under torchrun, rank 0 runs them and the other ranks return


def run_stage(cfg: DictConfig, stage: Optional[str] = None, resume: Optional[str] = None,
              overwrite: bool = False) -> dict[str, float]:
    """Run one stage: merge its `stages.<name>` overrides, save the merged config, seed, run, save metrics.

    A stage folder that already holds a run is never overwritten silently: resume it or pass `overwrite`; two runs
    never write into one folder at once (claimed_stage_folder). Under torchrun every rank runs this; rank 0 alone
    writes into work_dir.
    """
    stage = stage or cfg.stage
    if stage not in list_registered("stage"):
        ready = ", ".join(s for s in STAGE_ORDER if s in list_registered("stage"))
        raise ConfigError(f"stage '{stage}' is not available in this version of hat; available: {ready}")
    cfg = stage_config(cfg, stage)
    w = distributed.world()
    if stage in SINGLE_PROCESS_STAGES:
        if not w.is_main:
            log.info("stage %s runs on rank 0 alone", stage)
            return {}
    else:
        distributed.setup(cfg.trainer.device, cfg.trainer.dist_timeout_s)
    with claimed_stage_folder(Path(cfg.work_dir) / stage, resume, overwrite) as out_dir:
        if w.is_main:
            save_config(cfg, out_dir / "config.yaml")
        if cfg.trainer.keep_freed_memory:
            keep_freed_memory()
        seed_everything(cfg.seed + w.rank, cfg.trainer.deterministic)  # DDP starts every rank from rank 0's weights
        log.info("stage %s: writing to %s", stage, out_dir)
        metrics = get(stage, kind="stage")(cfg, out_dir, resume)
        if w.is_main:
            atomic_write(out_dir / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    for line in stage_summary(stage, metrics, Path(cfg.work_dir) / stage, cfg.trainer.epochs):
        log.info(line)
    return metrics


def stage_summary(stage: str, metrics: dict[str, float], out_dir: Path, epochs: int) -> list[str]:
    """The lines a stage ends with: its result (the best epoch's, which best.pt holds, and the last epoch's when
    they differ) and where its outputs are."""
    last = {k: v for k, v in metrics.items() if not k.startswith("best/")}
    lines = [f"stage {stage} done: " + "  ".join(f"{k} {v:.4g}" for k, v in last.items())]
    if "best/epoch" in metrics:
        best = {k[len("best/"):]: v for k, v in metrics.items() if k.startswith("best/") and k != "best/epoch"}
        lines[0] = (f"stage {stage} done: best epoch {int(metrics['best/epoch'])}/{epochs} (best.pt): "
                    + "  ".join(f"{k} {v:.4g}" for k, v in best.items()))
        if best != last:
            lines.append("  last epoch (last.pt): " + "  ".join(f"{k} {v:.4g}" for k, v in last.items()))
    lines.append(f"  outputs: {out_dir} ({', '.join(sorted(p.name for p in out_dir.iterdir()))})"
                 if out_dir.is_dir() else f"  outputs: {out_dir}")
    return lines


MODEL_CONTRACT = ("a HAT model is an nn.Module whose forward(images, targets) returns (loss, outputs) in training "
                  "(the loss a tensor or a dict of named terms), outputs in eval, and whose deploy_model() returns the "
                  "part that is quantized and deployed (no loss, no post-processing); see hat/models/classifier.py")


def build_model(cfg: DictConfig) -> nn.Module:
    """`cfg.model` from the zoo (kind model) or a structure built from parts (kind structure), checked against the
    model contract (a user's registered model that is not one gets a one-line error, not a TypeError later)."""
    model = build(cfg.model, "model", kind=("model", "structure"))
    if not isinstance(model, nn.Module) or not callable(getattr(model, "deploy_model", None)):
        made = type(model)
        raise ConfigError(f"model.type '{cfg.model.type}' builds {made.__module__}.{made.__qualname__}, which does not "
                          f"follow the model contract: {MODEL_CONTRACT}")
    return model


def build_trainer(cfg: DictConfig, model: nn.Module, out_dir: Path,
                  eval_context: Callable[[], ContextManager] = contextlib.nullcontext) -> Trainer:
    """Data, optimizer, schedule and the standard callbacks around `model`: shared by every training stage.

    Under torchrun each rank trains on its shard and the model is wrapped in DDP; rank 0 alone writes. The
    optimizer is built here, after the model is final (prepared for QAT), so it holds the right parameters."""
    w, t = distributed.world(), cfg.trainer
    device = distributed.setup(t.device, t.dist_timeout_s)
    model.to(device)
    train_loader = build_loader(build_dataset(cfg.data, "train"), cfg.data, train=True, seed=cfg.seed,
                                num_replicas=w.size, rank=w.rank)
    val_loader = build_loader(build_dataset(cfg.data, "val"), cfg.data, train=False, seed=cfg.seed,
                              num_replicas=w.size, rank=w.rank)
    with eval_context():  # QAT: observers frozen, so this check does not move the calibrated ranges
        check_model_fits_data(cfg, model, val_loader, device)
    optimizer, lr_line = build_optimizer(cfg, model.parameters(), w.size, len(train_loader.sampler))
    _report_lr(cfg, optimizer.param_groups[0]["lr"], lr_line)
    evaluator = build_evaluator(cfg)
    callbacks: list[Callback] = [EvalCallback(val_loader, t.eval_interval, eval_context, evaluator)]
    if w.is_main:
        shown = next(iter(val_loader))[0][:PREVIEW_IMAGES]
        names = getattr(val_loader.dataset, "class_names", None)
        callbacks += [CheckpointCallback(out_dir, OmegaConf.to_yaml(cfg), t.best_metric or evaluator.main_metric,
                                         t.best_mode),
                      TensorBoardCallback(out_dir / "tb", t.log_interval, {"lr": lr_line},
                                          lambda trainer: preview(trainer.bare_model, shown, names, eval_context),
                                          hparams=lambda writer, metrics: write_hparams(writer, cfg, metrics),
                                          histograms=lambda writer, trainer: write_model_histograms(
                                              writer, trainer.bare_model, cfg.stage, trainer.step),
                                          histogram_interval=t.histogram_interval),
                      ProgressCallback(t.progress_bar)]
    model = distributed.wrap_model(model, device, t.sync_bn)
    trainer = Trainer(model, optimizer, train_loader, t.epochs, None, callbacks, device,
                      t.clip_grad_norm, t.accum_steps, t.amp, t.log_interval, t.on_nonfinite)
    if cfg.scheduler:
        trainer.scheduler = build(cfg.scheduler, "scheduler", kind="scheduler", optimizer=optimizer,
                                  epochs=t.epochs, steps_per_epoch=trainer.steps_per_epoch)
    return trainer


def build_evaluator(cfg: DictConfig) -> Evaluator:
    """The `evaluator:` of the config (COCOEvaluator, MeanIoU, ...); top-1 accuracy when it names none."""
    if cfg.get("evaluator") is None:
        return Accuracy()
    return build(cfg.evaluator, "evaluator", kind="evaluator")


def _report_lr(cfg: DictConfig, lr: float, line: str) -> None:
    """Print how the LR was reached; warn when a larger global batch keeps an unscaled LR, or a scaled-up LR has
    no warmup."""
    log.info("LR: %s", line)
    opt, scheduler = cfg.optimizer, cfg.scheduler or {}
    grown = distributed.world().size * cfg.trainer.accum_steps > 1
    if grown and opt.get("base_batch_size") is None and opt.get("lr_scaling") != "none":
        log.warning("FAQ 2.3 Q1: accuracy drops on more devices when the LR does not follow the global batch; set "
                    "optimizer.base_batch_size (or optimizer.lr_scaling=none to keep the LR on purpose)")
    if lr > opt.lr and not scheduler.get("warmup_epochs") and scheduler.get("type") != "OneCycleLR":
        log.warning("the LR is scaled up x%g with no warmup: large global batches usually need "
                    "scheduler.warmup_epochs (1-5)", lr / opt.lr)


def check_model_fits_data(cfg: DictConfig, model: nn.Module, loader: DataLoader, device: torch.device) -> None:
    """One validation batch through the model, so a class-count or channel mismatch is a config error up front."""
    images, targets = to_device(next(iter(loader)), device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(images, targets)
    except (RuntimeError, IndexError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(f"model '{cfg.model.type}' does not fit data '{cfg.data.val.type}' (images "
                          f"{tuple(images.shape[1:])}, {getattr(loader.dataset, 'num_classes', '?')} classes): "
                          f"{reason}. Check the model's num_classes (model.num_classes, or model.head.num_classes "
                          f"of a structure) and in_channels") from None
    finally:
        model.train(was_training)


RECIPE_KEYS = ("model", "optimizer.type", "scheduler.type")


def resume_trainer(trainer: Trainer, path: str | Path, cfg: DictConfig, keys: Sequence[str] = RECIPE_KEYS) -> None:
    """Restore a trainer and its checkpoint callback's best metric from `path`."""
    state = load_checkpoint(path, required=CHECKPOINT_KEYS)
    _check_same_recipe(state, cfg, path, keys)
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"cannot resume from {path}: it does not fit this model/optimizer ({reason})") from None
    trainer.metrics = dict(state.get("metrics") or {})
    for callback in trainer.callbacks:
        if isinstance(callback, CheckpointCallback):
            callback.load_state(state)
    log.info("resumed from %s at epoch %d, step %d", path, trainer.epoch, trainer.step)


def config_differences(state: dict, current: DictConfig, keys: Sequence[str]) -> list[str]:
    """The `keys` whose value in the config saved in a checkpoint differs from `current` ("key: old -> new")."""
    if not state.get("config"):
        return []
    saved = OmegaConf.create(state["config"])
    return [f"{key}: {OmegaConf.select(saved, key)} -> {OmegaConf.select(current, key)}" if "." in key else key
            for key in keys if OmegaConf.select(saved, key) != OmegaConf.select(current, key)]


def _check_same_recipe(state: dict, current: DictConfig, path: str | Path, keys: Sequence[str]) -> None:
    """Resuming with another model, optimizer or schedule cannot continue the same run: say which differs."""
    differ = config_differences(state, current, keys)
    if differ:
        raise CheckpointError(f"cannot resume from {path}: {', '.join(differ)} differ from the run that wrote it "
                              f"(see its config.yaml); resume with the same config, or start a new run with "
                              f"--overwrite or another work_dir")


@register(kind="stage", name="float")
def float_stage(cfg: DictConfig, out_dir: Path, resume: Optional[str]) -> dict[str, float]:
    """Ordinary training from scratch, or from `pretrained` weights."""
    model = build_model(cfg)
    pretrained = pretrained_path(cfg.pretrained, cfg.model.type)
    if pretrained and not resume:
        report_pretrained(pretrained, load_pretrained(model, pretrained))
    trainer = build_trainer(cfg, model, out_dir)
    if resume:
        resume_trainer(trainer, out_dir / "last.pt" if resume == "auto" else resume, cfg)
    return fit(trainer)


def fit(trainer: Trainer) -> dict[str, float]:
    """Train; the last epoch's metrics plus the best epoch's (`best/<key>`, `best/epoch`: the best.pt that the next
    stage reads)."""
    metrics = trainer.fit()
    for callback in trainer.callbacks:
        if isinstance(callback, CheckpointCallback):
            metrics = {**metrics, **callback.report()}
    return metrics
