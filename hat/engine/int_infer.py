"""The int_infer stage: QAT checkpoint -> convert -> check_model -> compile -> evaluate the integer program.

It writes `work_dir/int_infer/` with the program (model.hir), the deployability report (check_report.txt) and the
accuracy table (summary.md), and prints the table: the evaluator's metrics (top-1, mAP, mIoU) of float /
calibration / QAT / quantized / integer program, the number of output elements where the program and the quantized
model differ (0: bit-exact) and, for classifiers, the QAT-vs-integer top-1 agreement.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils._pytree import tree_leaves

from hat import backend
from hat.backend.j5.checker import ModelCheckError, Report, export_requested
from hat.data import build_dataset, build_loader
from hat.engine.stage_events import stage_writer, write_hparams
from hat.engine.quant_stages import calibrate, load_quantized_weights, prepared_model, previous_weights
from hat.engine.stages import build_evaluator, build_model
from hat.evaluation import Accuracy, Evaluator
from hat.errors import ConfigError
from hat.quant import convert
from hat.registry import register

log = logging.getLogger("hat")
PROGRAM_FILE = "model.hir"


def deploy_part(model: nn.Module) -> nn.Module:
    """The inference part of a model (Classifier.deploy_model()), or the model itself."""
    return model.deploy_model() if hasattr(model, "deploy_model") else model


def structure_postprocess(cfg: DictConfig) -> Optional[Callable]:
    """The config's structure's `postprocess` (decoding + NMS, per-pixel argmax), or None (classifiers)."""
    return getattr(build_model(cfg), "postprocess", None)


class QuantizedModels(NamedTuple):
    qat: nn.Module  # the QAT deploy model (fake quant, validation state)
    quantized: nn.Module  # the converted deploy model: integer arithmetic
    postprocess: Optional[Callable]  # the structure's post-process of their outputs, or None (classifiers)


def quantized_models(cfg: DictConfig, checkpoint: Path) -> QuantizedModels:
    """The QAT and quantized deploy models from a calibration or QAT checkpoint of this config, and the structure's
    post-process."""
    model = prepared_model(cfg)
    load_quantized_weights(model, cfg, checkpoint, "convert it with the config it was trained with, or rerun the "
                                                   "stages that wrote it")
    model.eval()
    return QuantizedModels(deploy_part(model), deploy_part(convert(model)), getattr(model, "postprocess", None))


def model_to_check(cfg: DictConfig, checkpoint: Optional[str] = None) -> tuple[nn.Module, str]:
    """The quantized deploy model tools/check_model.py checks, and where its weights come from: `checkpoint`, else
    the project's QAT or calibration checkpoint, else the float (or initial) weights calibrated here on a few
    training batches, so a model's deployability is known before any QAT is spent on it."""
    work_dir = Path(cfg.work_dir)
    found = [path for path in (work_dir / "qat" / "best.pt", work_dir / "calibration" / "best.pt") if path.is_file()]
    if checkpoint or found:
        path = Path(checkpoint) if checkpoint else found[0]
        return quantized_models(cfg, path).quantized, f"weights from {path}"
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
def evaluate_program(program: backend.Program, loader, evaluator: Optional[Evaluator] = None,
                     postprocess: Optional[Callable] = None, qat_model: Optional[nn.Module] = None,
                     qmodel: Optional[nn.Module] = None) -> dict[str, float]:
    """The evaluator's metrics (default top-1) of the integer program on `loader`, its outputs post-processed by
    `postprocess` (the structure's: decoding + NMS for a detector) like the models' are. With the QAT and quantized
    models: their metrics too (keys suffixed `_qat`, `_quantized`), the count of output elements where program and
    quantized model differ (all outputs; 0 is bit-exact) and, for class scores, the QAT-vs-program top-1 agreement."""
    runs = {"": program, "_qat": qat_model, "_quantized": qmodel}
    runs = {suffix: run for suffix, run in runs.items() if run is not None}
    evaluators = {suffix: copy.deepcopy(evaluator) if evaluator is not None else Accuracy() for suffix in runs}
    for e in evaluators.values():
        e.reset()
    finish = postprocess or (lambda outputs: outputs)
    agree = mismatches = count = 0
    seconds = 0.0
    for images, targets in loader:
        outputs = {}
        for suffix, run in runs.items():
            start = time.perf_counter()
            outputs[suffix] = run(images)
            if suffix == "":
                seconds += time.perf_counter() - start
            evaluators[suffix].update(finish(outputs[suffix]), targets)
        if qmodel is not None:
            mismatches += sum(int((a != b).sum()) for a, b in zip(tree_leaves(outputs["_quantized"]),
                                                                   tree_leaves(outputs[""])))
        if qat_model is not None and _class_scores(outputs[""]):
            agree += int((outputs["_qat"].argmax(1) == outputs[""].argmax(1)).sum())
        count += len(images)
    metrics: dict[str, float] = {}
    for suffix, e in evaluators.items():
        metrics.update({f"{key}{suffix}": value for key, value in e.compute().items()})
    metrics["program_seconds"] = seconds
    if qat_model is not None and count and _class_scores(outputs[""]):
        metrics["val/agreement_qat_int"] = 100.0 * agree / count
    if qmodel is not None:
        metrics["val/bit_exact_mismatches"] = float(mismatches)
    return metrics


def _class_scores(outputs: Any) -> bool:
    """Whether outputs are one [N, classes] tensor, whose argmax is a predicted class."""
    return isinstance(outputs, torch.Tensor) and outputs.dim() == 2


def accuracy_table(work_dir: Path, metrics: dict[str, float], keys: Sequence[str] = ("val/top1",)) -> str:
    """The stage-by-stage table of the evaluator's metrics `keys` (markdown); earlier stages' numbers come from
    their metrics.json."""
    def earlier(stage: str) -> list[Optional[float]]:
        path = work_dir / stage / "metrics.json"
        found = json.loads(path.read_text()) if path.is_file() else {}
        return [found.get(f"best/{key}", found.get(key)) for key in keys]  # best.pt's: the checkpoint used next

    def cells(values: Sequence[Optional[float]]) -> str:
        return " | ".join("-" if v is None else f"{v:.2f}" for v in values)

    rows = [("float", earlier("float")), ("calibration", earlier("calibration")),
            ("QAT (fake quant)", [metrics.get(f"{key}_qat") for key in keys]),
            ("quantized model", [metrics.get(f"{key}_quantized") for key in keys]),
            ("integer program", [metrics.get(key) for key in keys])]
    names = " | ".join(f"{key.split('/')[-1]}{' %' if key != 'val/loss' else ''}" for key in keys)
    lines = [f"| model | {names} |", "|---" * (len(keys) + 1) + "|", *(f"| {name} | {cells(values)} |"
                                                                       for name, values in rows)]
    mismatches = int(metrics["val/bit_exact_mismatches"])
    agreement = (f"QAT vs integer program top-1 agreement: {metrics['val/agreement_qat_int']:.2f}%; "
                 if "val/agreement_qat_int" in metrics else "")
    lines.append(f"\n{agreement}program vs quantized model: {mismatches} differing output elements "
                 f"({'bit-exact' if mismatches == 0 else 'NOT bit-exact'})")
    return "\n".join(lines)


@register(kind="stage", name="int_infer")
def int_infer_stage(cfg: DictConfig, out_dir: Path, resume: Optional[str]) -> dict[str, float]:
    """QAT checkpoint -> quantized model -> checked integer program -> evaluated on the validation set."""
    if resume:
        raise ConfigError("int_infer has nothing to resume: run it again with --overwrite")
    qat_model, qmodel, postprocess = quantized_models(cfg, previous_weights(cfg, "qat"))
    loader = build_loader(build_dataset(cfg.data, "val"), cfg.data, train=False, seed=cfg.seed)
    example = next(iter(loader))[0]
    report = check_and_compile(qmodel, example, cfg.quant.march, out_dir, cfg.quant.export_on_check_failure)
    program = backend.load(out_dir / PROGRAM_FILE)  # evaluate what was written, not what is in memory
    evaluator = build_evaluator(cfg)
    metrics = evaluate_program(program, loader, evaluator, postprocess, qat_model, qmodel)
    keys = [key for key in metrics if f"{key}_quantized" in metrics]  # the evaluator's, e.g. val/mAP, val/mAP50
    table = accuracy_table(Path(cfg.work_dir), metrics, keys)
    layers = per_layer_error(cfg, qat_model, qmodel, program, example)
    layer_text = f"\n\n## Per-layer error (one validation batch)\n\n```\n{layers}\n```" if layers else ""
    (out_dir / "summary.md").write_text(f"# {cfg.model.type} on {cfg.data.val.type}\n\n{table}{layer_text}\n\n"
                                        f"{report}\n")
    print(table)
    with stage_writer(out_dir) as writer:  # int_infer runs on rank 0 alone
        for key, value in metrics.items():
            writer.add_scalar(key, value, 0)
        writer.add_text("int_infer/accuracy", table, 0)
        if layers:
            for row in layers:
                sqnr = row.diffs.get(("float", "qat"))
                if sqnr is not None and math.isfinite(sqnr.sqnr_db):
                    writer.add_scalar(f"int_infer/sqnr_db/{row.layer}", sqnr.sqnr_db, 0)
            writer.add_text("int_infer/layers", "\n".join(f"    {line}" for line in str(layers).splitlines()), 0)
        write_hparams(writer, cfg, metrics)
    return metrics


def per_layer_error(cfg: DictConfig, qat_model: nn.Module, qmodel: nn.Module, program: backend.Program,
                    images: torch.Tensor):
    """Each layer's float-vs-QAT-vs-quantized-vs-program similarity on `images` (hat.debug), or None without the
    float checkpoint to compare with."""
    from hat.checkpoint import load_checkpoint, load_weights
    from hat.debug.similarity import layer_similarity

    path = Path(cfg.work_dir) / "float" / "best.pt"
    if not path.is_file():
        log.info("no %s: the per-layer error table needs the float checkpoint, skipped", path)
        return None
    model = build_model(cfg)
    load_weights(model, load_checkpoint(path, required=("model",))["model"], path, "rerun the float stage")
    return layer_similarity(deploy_part(model).eval(), qat_model, qmodel, program, [images])
