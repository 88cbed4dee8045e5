"""The calibration and QAT stages: prepare the float model for QAT, observe ranges, train with fake quant."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hat.checkpoint import load_checkpoint, load_weights, save_checkpoint
from hat.config import save_config
from hat.data import build_dataset, build_loader
from hat.engine import distributed
from hat.engine.stage_events import stage_writer, write_hparams, write_quantizer_ranges
from hat.engine.stages import (RECIPE_KEYS, build_evaluator, build_model, build_trainer, config_differences, fit,
                               resume_trainer)
from hat.engine.trainer import Callback, Trainer, evaluate
from hat.errors import CheckpointError, ConfigError
from hat.quant import (freeze_bn, get_default_qat_out_qconfig, get_default_qat_qconfig, prepare_qat,
                       set_fake_quant_state)
from hat.quant.observer import synchronized_observers
from hat.quant.qconfig import QConfig, check_module_name
from hat.registry import register

log = logging.getLogger("hat")
ADAPTIVE_OPTIMIZERS = ("AdamW",)
QUANT_KEYS = ("quant.activation_dtype", "quant.algorithm", "quant.int16_modules", "quant.high_precision_outputs",
              "quant.float_modules")  # what shapes the prepared model and its calibrated ranges


def qconfig_dict_from_config(cfg: DictConfig, model: nn.Module) -> dict:
    """The `quant:` section as a qconfig_dict; parts outside the deploy model (loss, aux heads) stay float."""
    q = cfg.quant
    try:
        base = get_default_qat_qconfig(activation_dtype=q.activation_dtype, algorithm=q.algorithm, march=q.march)
        special: list[tuple[str, Optional[QConfig]]] = (
            [(n, get_default_qat_qconfig(activation_dtype="qint16", algorithm=q.algorithm, march=q.march))
             for n in q.int16_modules]
            + [(n, get_default_qat_out_qconfig(algorithm=q.algorithm, march=q.march)) for n in q.high_precision_outputs]
            + [(n, None) for n in q.float_modules])
    except ValueError as exc:
        raise ConfigError(f"quant: {exc}") from None
    names = [name for name, _ in model.named_modules() if name]
    for key in ("int16_modules", "high_precision_outputs", "float_modules"):
        for index, name in enumerate(q[key]):
            try:
                check_module_name(name, f"quant.{key}[{index}]", names)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    outside = [(name, None) for name in getattr(model, "NON_DEPLOY", ()) if name in names]
    return {"": base, "module_name": special + outside}


@contextlib.contextmanager
def fake_quant_state(model: nn.Module, state: str, restore: str) -> Iterator[None]:
    set_fake_quant_state(model, state)
    try:
        yield
    finally:
        set_fake_quant_state(model, restore)


def previous_weights(cfg: DictConfig, stage: str) -> Path:
    path = Path(cfg.work_dir) / stage / "best.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: run the {stage} stage first "
                              f"(tools/train.py --config ... --stage {stage})")
    return path


def prepared_model(cfg: DictConfig, float_weights: Optional[Path] = None) -> nn.Module:
    """The zoo model of `cfg` (with `float_weights` loaded), prepared for QAT with the `quant:` section, fake quant
    in validation state."""
    model = build_model(cfg)
    if float_weights is not None:
        load_weights(model, load_checkpoint(float_weights, required=("model",))["model"], float_weights,
                     "it is not a float checkpoint of this config's model; use the config it was trained with, "
                     "or rerun --stage float")
    model = prepare_qat(model, qconfig_dict_from_config(cfg, model))
    set_fake_quant_state(model, "validation")
    return model


def load_quantized_weights(model: nn.Module, cfg: DictConfig, path: Path, fix: str) -> None:
    """Load a calibration/QAT checkpoint into the prepared `model`, refusing one written with another model or
    quant config (its ranges and layers would not fit); `fix` tells the user what to do then. Ends in validation
    state: a QAT checkpoint holds its observers switched on, and evaluating with them on would move the ranges."""
    state = load_checkpoint(path, required=("model",))
    changed = config_differences(state, cfg, ("model", *QUANT_KEYS))
    if changed:
        raise ConfigError(f"the config changed since {path} was written ({'; '.join(changed)}): {fix}")
    load_weights(model, state["model"], path, fix)
    set_fake_quant_state(model, "validation")


def calibrate(model: nn.Module, loader, batches: int, device: torch.device | str = "cpu") -> int:
    """Observers only (no fake quant, no gradients) over up to `batches` batches; ends in validation state.
    Returns the number of batches seen."""
    set_fake_quant_state(model, "calibration")
    seen = 0
    with torch.no_grad():
        for seen, (images, _) in enumerate(loader, start=1):
            model(images.to(device))
            if seen == batches:
                break
    set_fake_quant_state(model, "validation")
    return seen


@register(kind="stage", name="calibration")
def calibration_stage(cfg: DictConfig, out_dir: Path, resume: Optional[str]) -> dict[str, float]:
    """Float weights -> prepare -> observers only (no fake quant, no gradients) over N batches -> evaluate."""
    source = previous_weights(cfg, "float")
    model = prepared_model(cfg, source)
    w = distributed.world()
    device = distributed.setup(cfg.trainer.device, cfg.trainer.dist_timeout_s)
    model.to(device).eval()  # batch norm uses its running statistics, as deployed
    loader = build_loader(build_dataset(cfg.data, "train"), cfg.data, train=True, seed=cfg.seed,
                          num_replicas=w.size, rank=w.rank)
    with synchronized_observers(model, distributed.active()):  # every rank ends with the global batches' ranges
        seen = calibrate(model, loader, cfg.quant.calibration_batches, device)
    if seen == 0:
        raise ConfigError(f"calibration saw no data: data.train ({cfg.data.train.type}) is empty")
    val_loader = build_loader(build_dataset(cfg.data, "val"), cfg.data, train=False, seed=cfg.seed,
                              num_replicas=w.size, rank=w.rank)
    metrics = evaluate(model, val_loader, device, build_evaluator(cfg))
    log.info("calibrated on %d batches of %d images x %d processes from %s", seen, cfg.data.batch_size, w.size,
             source)
    if w.is_main:
        state = {"model": model.state_dict(), "config": OmegaConf.to_yaml(cfg), "metrics": metrics}
        save_checkpoint(state, out_dir / "best.pt")
    with stage_writer(out_dir) as writer:
        if writer is not None:
            write_quantizer_ranges(writer, model)
            for key, value in metrics.items():
                writer.add_scalar(key, value, 0)
            write_hparams(writer, cfg, metrics)
    return metrics


@register(kind="stage", name="qat")
def qat_stage(cfg: DictConfig, out_dir: Path, resume: Optional[str]) -> dict[str, float]:
    """Calibrated model -> fake-quant training; the optimizer is built after prepare, from the QAT model."""
    model = prepared_model(cfg)
    if not resume:
        load_quantized_weights(model, cfg, previous_weights(cfg, "calibration"), "the calibrated ranges in it no "
                               "longer fit; rerun --stage calibration (with --overwrite)")
    cfg = _sgd_fallback(cfg)
    if distributed.world().is_main:
        save_config(cfg, out_dir / "config.yaml")  # the recipe QAT really runs with
    set_fake_quant_state(model, "qat")
    trainer = build_trainer(cfg, model, out_dir, lambda: fake_quant_state(model, "validation", restore="qat"))
    if cfg.quant.freeze_bn_epoch is not None:
        trainer.callbacks.insert(0, _FreezeBN(cfg.quant.freeze_bn_epoch))
    if resume:
        resume_trainer(trainer, out_dir / "last.pt" if resume == "auto" else resume, cfg, (*RECIPE_KEYS, *QUANT_KEYS))
    with synchronized_observers(model, distributed.active()):  # identical scales on every rank, every step
        return fit(trainer)


class _FreezeBN(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def before_epoch(self, trainer: Trainer) -> None:
        if trainer.epoch >= self.epoch:
            freeze_bn(trainer.model)


def _sgd_fallback(cfg: DictConfig) -> DictConfig:
    """FAQ 2.3 Q4: OneCycle or adaptive optimizers destabilise QAT; unless stages.qat sets an optimizer, use SGD."""
    own = (cfg.stages or {}).get("qat") or {}
    adaptive = cfg.optimizer.type in ADAPTIVE_OPTIMIZERS
    onecycle = cfg.scheduler is not None and cfg.scheduler.type == "OneCycleLR"
    if "optimizer" in own or not (adaptive or onecycle):
        return cfg
    replaced = "OneCycleLR" if onecycle else cfg.optimizer.type
    cfg = cfg.copy()
    cfg.optimizer = {"type": "SGD", "lr": cfg.quant.sgd_fallback_lr, "momentum": 0.9,
                     "weight_decay": cfg.optimizer.get("weight_decay", 0.0),
                     "base_batch_size": cfg.optimizer.get("base_batch_size"), "lr_scaling": "linear"}
    cfg.scheduler = {"type": "CosineLR"}
    log.warning("QAT: the float recipe used %s; QAT uses SGD(lr=%g, momentum=0.9) with a cosine schedule instead "
                "(set stages.qat.optimizer to choose your own)", replaced, cfg.quant.sgd_fallback_lr)
    return cfg
