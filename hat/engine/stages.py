"""Stages: each takes the validated config, reads the previous stage's checkpoint, writes `work_dir/<stage>/`.

float -> calibration -> qat -> int_infer (see STAGE_ORDER). A stage is a registered function
`(cfg, out_dir, resume) -> metrics`; the quantization and backend work registers the later ones.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from torch import nn

from hat.checkpoint import load_checkpoint, load_pretrained
from hat.config import STAGE_ORDER, save_config, stage_config
from hat.data import build_dataset, build_loader
from hat.engine.callbacks import CheckpointCallback, EvalCallback, ProgressCallback, TensorBoardCallback
from hat.engine.runtime import seed_everything, select_device
from hat.engine.trainer import Trainer
from hat.errors import ConfigError
from hat.models.zoo import report_pretrained
from hat.registry import build, get, list_registered, register

log = logging.getLogger("hat")
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "step", "rng")


def run_stage(cfg: DictConfig, stage: Optional[str] = None, resume: Optional[str] = None,
              overwrite: bool = False) -> dict[str, float]:
    """Run one stage: merge its `stages.<name>` overrides, save the merged config, run, save metrics.

    A stage folder that already holds a run is never overwritten silently: resume it or pass `overwrite`.
    """
    stage = stage or cfg.stage
    if stage not in list_registered("stage"):
        ready = ", ".join(s for s in STAGE_ORDER if s in list_registered("stage"))
        raise ConfigError(f"stage '{stage}' is not available in this version of hat; available: {ready}")
    cfg = stage_config(cfg, stage)
    out_dir = Path(cfg.work_dir) / stage
    if (out_dir / "last.pt").exists() and not resume and not overwrite:
        raise ConfigError(f"{out_dir} already holds a run (last.pt); continue it with --resume, replace it with "
                          f"--overwrite, or pick another work_dir=...")
    save_config(cfg, out_dir / "config.yaml")
    log.info("stage %s: writing to %s (TensorBoard: tensorboard --logdir %s)", stage, out_dir, out_dir / "tb")
    metrics = get(stage, kind="stage")(cfg, out_dir, resume)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("stage %s done: %s", stage, "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


def build_model(cfg: DictConfig) -> nn.Module:
    """`cfg.model` from the zoo (kind model) or a structure built from parts (kind structure)."""
    return build(cfg.model, "model", kind=("model", "structure"))


def build_trainer(cfg: DictConfig, model: nn.Module, out_dir: Path) -> Trainer:
    """Data, optimizer, schedule and the standard callbacks around `model`: shared by every training stage."""
    device = select_device(cfg.trainer.device)
    model.to(device)
    train_loader = build_loader(build_dataset(cfg.data, "train"), cfg.data, train=True, seed=cfg.seed)
    val_loader = build_loader(build_dataset(cfg.data, "val"), cfg.data, train=False, seed=cfg.seed)
    if cfg.optimizer is None:
        raise ConfigError("optimizer: missing; add `/optimizer: sgd` to the config's defaults or set optimizer.type")
    optimizer = build(cfg.optimizer, "optimizer", kind="optimizer", params=model.parameters())
    steps_per_epoch = math.ceil(len(train_loader) / max(1, cfg.trainer.accum_steps))
    scheduler = (build(cfg.scheduler, "scheduler", kind="scheduler", optimizer=optimizer, epochs=cfg.trainer.epochs,
                       steps_per_epoch=steps_per_epoch) if cfg.scheduler else None)
    t = cfg.trainer
    callbacks = [EvalCallback(val_loader, t.eval_interval),
                 CheckpointCallback(out_dir, OmegaConf.to_yaml(cfg)),
                 TensorBoardCallback(out_dir / "tb", t.log_interval),
                 ProgressCallback(t.progress_bar)]
    return Trainer(model, optimizer, train_loader, t.epochs, scheduler, callbacks, device,
                   t.clip_grad_norm, t.accum_steps, t.amp, t.log_interval)


def resume_trainer(trainer: Trainer, path: str | Path) -> None:
    """Restore a trainer and its checkpoint callback's best metric from `path`."""
    state = load_checkpoint(path, required=CHECKPOINT_KEYS)
    trainer.load_state_dict(state)
    for callback in trainer.callbacks:
        if isinstance(callback, CheckpointCallback):
            callback.best = state.get("best_metric")
    log.info("resumed from %s at epoch %d, step %d", path, trainer.epoch, trainer.step)


@register(kind="stage", name="float")
def float_stage(cfg: DictConfig, out_dir: Path, resume: Optional[str]) -> dict[str, float]:
    """Ordinary training from scratch, or from `pretrained` weights."""
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    model = build_model(cfg)
    if cfg.pretrained and not resume:
        report_pretrained(cfg.pretrained, load_pretrained(model, cfg.pretrained))
    trainer = build_trainer(cfg, model, out_dir)
    if resume:
        resume_trainer(trainer, out_dir / "last.pt" if resume == "auto" else resume)
    return trainer.fit()
