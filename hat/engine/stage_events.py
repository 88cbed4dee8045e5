"""TensorBoard for the stages that do not train: calibration's quantizer ranges, int_infer's table and metrics, and
each stage's hyperparameters (the training stages write theirs through TensorBoardCallback).

Tags: calibration writes `calibration/range/<module>` (the activation range each layer's scale covers),
histograms `calibration/activation_scales` and `calibration/weight_scales`, the text `calibration/ranges`;
int_infer writes every metric as a scalar (`val/top1`, `val/top1_qat`, ...) and the text `int_infer/accuracy`;
every stage writes its hyperparameters and results under `hparams/` (TensorBoard's HPARAMS tab). The training
stages write every `trainer.histogram_interval` epochs their weights (`<stage>/weights/<parameter>`) and, in QAT,
the quantizers' ranges and scales (`qat/range/<module>`, `qat/activation_scales`, `qat/weight_scales`).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from hat.engine import distributed

log = logging.getLogger("hat")
HPARAM_KEYS = ("model.type", "optimizer.type", "optimizer.lr", "scheduler.type", "data.batch_size", "trainer.epochs",
               "seed", "quant.march", "quant.algorithm")


def hparams(cfg: DictConfig) -> dict[str, Any]:
    """The run's main settings as TensorBoard takes them (numbers, strings, booleans)."""
    found = {key: OmegaConf.select(cfg, key, default=None) for key in HPARAM_KEYS}
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in found.items() if value is not None}


def write_hparams(writer, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """The stage's settings with its results (`hparams/<metric>`), in the same folder as its curves."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    results = {f"hparams/{key}": float(value) for key, value in metrics.items() if isinstance(value, (int, float))}
    for summary in hparams_summary(hparams(cfg), results):  # into this writer's file: one event file per run
        writer.file_writer.add_summary(summary)
    for tag, value in results.items():
        writer.add_scalar(tag, value, 0)


@contextlib.contextmanager
def stage_writer(out_dir: Path) -> Iterator[Optional[Any]]:
    """A SummaryWriter on out_dir/tb on rank 0 (None on the others), closed at the end."""
    if not distributed.world().is_main:
        yield None
        return
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir / "tb"))
    log.info("TensorBoard: tensorboard --logdir %s", out_dir / "tb")
    try:
        yield writer
    finally:
        writer.close()


def write_quantizer_ranges(writer, model: nn.Module, prefix: str = "calibration", step: int = 0,
                           table: bool = True) -> None:
    """Each activation quantizer's covered range (scale * qmax) per module, all scales as histograms, and (`table`)
    a table, under `prefix`/."""
    from hat.quant.fake_quantize import FakeQuantize

    rows, activation_scales, weight_scales = [], [], []
    for name, module in model.named_modules():
        if not isinstance(module, FakeQuantize):
            continue
        scale = module.scale.detach().float().flatten().cpu()
        if module.ch_axis is None:  # activations: one scale per tensor
            covered = float(scale[0]) * module.quant_max
            owner = name.rsplit(".", 1)[0] if "." in name else name
            writer.add_scalar(f"{prefix}/range/{owner}", covered, step)
            rows.append(f"| {owner} | {module.dtype} | {float(scale[0]):.6g} | +-{covered:.4g} |")
            activation_scales.append(scale)
        else:
            weight_scales.append(scale)
    for tag, scales in ((f"{prefix}/activation_scales", activation_scales), (f"{prefix}/weight_scales", weight_scales)):
        if scales:
            writer.add_histogram(tag, torch.cat(scales), step)
    if rows and table:
        writer.add_text(f"{prefix}/ranges", "\n".join(["| module | dtype | scale | range |", "|---|---|---|---|",
                                                         *rows]), step)


def write_model_histograms(writer, model: nn.Module, prefix: str, step: int) -> None:
    """Every weight as a histogram (`<prefix>/weights/<parameter>`) and, in a QAT model, its quantizers' ranges and
    scales (write_quantizer_ranges): how they move during training."""
    for name, param in model.named_parameters():
        if name.endswith("weight"):
            writer.add_histogram(f"{prefix}/weights/{name}", param.detach().float().cpu(), step)
    write_quantizer_ranges(writer, model, prefix, step, table=False)
