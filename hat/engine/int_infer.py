"""The int_infer stage: QAT checkpoint -> convert -> check_model -> compile -> evaluate the integer program.

It writes `work_dir/int_infer/` with the program (model.hir), the deployability report (check_report.txt) and the
accuracy table (summary.md), and prints the table: float / calibration / QAT / quantized / integer program, the
QAT-vs-integer top-1 agreement, and the number of elements where the program and the quantized model differ
(0: bit-exact).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig
from torch import nn

from hat import backend
from hat.backend.j5.checker import ModelCheckError, Report, export_requested
from hat.data import build_dataset, build_loader
from hat.engine.quant_stages import calibrate, load_quantized_weights, prepared_model, previous_weights
from hat.errors import ConfigError
from hat.quant import convert
from hat.registry import register

log = logging.getLogger("hat")
PROGRAM_FILE = "model.hir"


def deploy_part(model: nn.Module) -> nn.Module:
    """The inference part of a model (Classifier.deploy_model()), or the model itself."""
    return model.deploy_model() if hasattr(model, "deploy_model") else model


def quantized_models(cfg: DictConfig, checkpoint: Path) -> tuple[nn.Module, nn.Module]:
    """(QAT deploy model, quantized deploy model) from a calibration or QAT checkpoint of this config."""
    model = prepared_model(cfg)
    load_quantized_weights(model, cfg, checkpoint, "convert it with the config it was trained with, or rerun the "
                                                   "stages that wrote it")
    model.eval()
    return deploy_part(model), deploy_part(convert(model))


def model_to_check(cfg: DictConfig, checkpoint: Optional[str] = None) -> tuple[nn.Module, str]:
    """The quantized deploy model tools/check_model.py checks, and where its weights come from: `checkpoint`, else
    the project's QAT or calibration checkpoint, else the float (or initial) weights calibrated here on a few
    training batches, so a model's deployability is known before any QAT is spent on it."""
    work_dir = Path(cfg.work_dir)
    found = [path for path in (work_dir / "qat" / "best.pt", work_dir / "calibration" / "best.pt") if path.is_file()]
    if checkpoint or found:
        path = Path(checkpoint) if checkpoint else found[0]
        return quantized_models(cfg, path)[1], f"weights from {path}"
    float_weights = work_dir / "float" / "best.pt"
    if float_weights.is_file():
        model = prepared_model(cfg, float_weights)
        source = f"float weights from {float_weights}, calibrated here on 2 batches"
    else:
        model = prepared_model(cfg)
        source = ("initial (untrained) weights calibrated here on 2 batches: structure and limits are checked; the "
                  "accumulator range depends on trained weights, so check again after training")
    calibrate(model.eval(), build_loader(build_dataset(cfg.data, "train"), cfg.data, train=True, seed=cfg.seed), 2)
    return deploy_part(convert(model.eval())), source


def check_and_compile(qmodel: nn.Module, example: torch.Tensor, march: str, out_dir: Path,
                      export_on_failure: bool = False) -> Report:
    """check_model; the report goes to out_dir/check_report.txt and the program to out_dir/model.hir. When the
    model is not deployable: ModelCheckError, after writing the traced program for diagnosis if asked
    (`export_on_failure`, or HNN_MODEL_EXPORT=1)."""
    report = backend.check_model(qmodel, example_inputs=(example,), march=march)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "check_report.txt").write_text(f"{report}\n")
    export = export_on_failure or export_requested()
    if report.program is not None and (report.deployable or export):
        path = report.program.save(out_dir / PROGRAM_FILE)
        log.info("integer program (%d ops) written to %s", len(report.program.nodes), path)
    if not report.deployable:
        note = f"\n(report: {out_dir / 'check_report.txt'}" + (
            f"; program for diagnosis: {out_dir / PROGRAM_FILE})" if export and report.program else ")")
        raise ModelCheckError(report, note)
    return report


@torch.no_grad()
def evaluate_program(program: backend.Program, loader, qat_model: Optional[nn.Module] = None,
                     qmodel: Optional[nn.Module] = None) -> dict[str, float]:
    """Top-1 of the integer program on `loader`; with the QAT and quantized models also their top-1, the
    QAT-vs-program top-1 agreement (%) and the count of output elements where program != quantized model."""
    correct = {"program": 0, "qat": 0, "quantized": 0}
    agree = mismatches = count = 0
    seconds = 0.0
    for images, targets in loader:
        start = time.perf_counter()
        logits = program.run(images)
        seconds += time.perf_counter() - start
        predicted = logits.argmax(1)
        correct["program"] += int((predicted == targets).sum())
        if qat_model is not None:
            qat_predicted = qat_model(images).argmax(1)
            correct["qat"] += int((qat_predicted == targets).sum())
            agree += int((qat_predicted == predicted).sum())
        if qmodel is not None:
            expected = qmodel(images)
            correct["quantized"] += int((expected.argmax(1) == targets).sum())
            mismatches += int((expected != logits).sum())
        count += len(targets)
    count = max(count, 1)
    metrics = {"val/top1": 100.0 * correct["program"] / count, "program_seconds": seconds}
    if qat_model is not None:
        metrics.update({"val/top1_qat": 100.0 * correct["qat"] / count, "val/agreement_qat_int": 100.0 * agree / count})
    if qmodel is not None:
        metrics.update({"val/top1_quantized": 100.0 * correct["quantized"] / count,
                        "val/bit_exact_mismatches": float(mismatches)})
    return metrics


def accuracy_table(work_dir: Path, metrics: dict[str, float]) -> str:
    """The stage-by-stage top-1 table (markdown); earlier stages' numbers come from their metrics.json."""
    def earlier(stage: str) -> str:
        path = work_dir / stage / "metrics.json"
        value = json.loads(path.read_text()).get("val/top1") if path.is_file() else None
        return f"{value:.2f}" if value is not None else "-"

    rows = [("float", earlier("float")), ("calibration", earlier("calibration")),
            ("QAT (fake quant)", f"{metrics['val/top1_qat']:.2f}"),
            ("quantized model", f"{metrics['val/top1_quantized']:.2f}"),
            ("integer program", f"{metrics['val/top1']:.2f}")]
    lines = ["| model | top-1 % |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]
    lines.append(f"\nQAT vs integer program top-1 agreement: {metrics['val/agreement_qat_int']:.2f}%; program vs "
                 f"quantized model: {int(metrics['val/bit_exact_mismatches'])} differing output elements "
                 f"({'bit-exact' if metrics['val/bit_exact_mismatches'] == 0 else 'NOT bit-exact'})")
    return "\n".join(lines)


@register(kind="stage", name="int_infer")
def int_infer_stage(cfg: DictConfig, out_dir: Path, resume: Optional[str]) -> dict[str, float]:
    """QAT checkpoint -> quantized model -> checked integer program -> evaluated on the validation set."""
    if resume:
        raise ConfigError("int_infer has nothing to resume: run it again with --overwrite")
    qat_model, qmodel = quantized_models(cfg, previous_weights(cfg, "qat"))
    loader = build_loader(build_dataset(cfg.data, "val"), cfg.data, train=False, seed=cfg.seed)
    example = next(iter(loader))[0]
    report = check_and_compile(qmodel, example, cfg.quant.march, out_dir, cfg.quant.export_on_check_failure)
    program = backend.load(out_dir / PROGRAM_FILE)  # evaluate what was written, not what is in memory
    metrics = evaluate_program(program, loader, qat_model, qmodel)
    table = accuracy_table(Path(cfg.work_dir), metrics)
    (out_dir / "summary.md").write_text(f"# {cfg.model.type} on {cfg.data.val.type}\n\n{table}\n\n{report}\n")
    print(table)
    return metrics
