"""Does a float model make it through? Every stage of the integer pipeline on a few batches, and how far it got.

    trial = backend.try_pipeline(torchvision.models.resnet18(num_classes=10).eval(), batches)
    trial.stage          # the last stage that worked: "bit_exact" when the program equals the quantized model
    trial.error          # why the next stage failed ("" when none did)

prepare_qat_fx -> calibration (on batches[1:]) -> one QAT backward -> convert -> check -> compile -> the program
equal to the quantized model on batches[0], on one sample, and after a .hir save/load. Cosines of the QAT
(validation state) and quantized outputs against the float model's say how close the integers stay. The model
breadth benchmark and the parametrized torchvision test run this one function.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

STAGES = ("build", "prepare", "calibration", "qat_step", "convert", "check", "compile", "bit_exact")


@dataclass
class Trial:
    stage: str = "build"
    cos_qat: Optional[float] = None
    cos_quantized: Optional[float] = None
    bit_exact: Optional[bool] = None
    error: str = ""
    exception: Optional[BaseException] = None

    @property
    def passed(self) -> bool:
        return self.stage == "bit_exact"


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def try_pipeline(model: nn.Module, batches: Sequence[torch.Tensor], march: str = "bayes",
                 qconfig_dict: Optional[dict] = None) -> Trial:
    """Run `model` (float, eval mode) through every stage on `batches` (two or more); the Trial says how far it got
    and, when a stage failed, why (`error`, and the exception itself)."""
    trial = Trial()
    try:
        _run(model, list(batches), march, qconfig_dict, trial)
    except Exception as exc:  # the trial reports where and why
        trial.error, trial.exception = " ".join(f"{type(exc).__name__}: {exc}".split()), exc
    return trial


def _run(model: nn.Module, batches: list[torch.Tensor], march: str, qconfig_dict: Optional[dict],
         trial: Trial) -> None:
    from hat import backend, quant

    x = batches[0]
    with torch.no_grad():
        reference = model(x)
    qat = quant.prepare_qat_fx(model, qconfig_dict, example_inputs=(x,))
    trial.stage = "prepare"
    quant.set_fake_quant_state(qat, "calibration")
    qat.eval()
    with torch.no_grad():
        for batch in batches[1:]:
            qat(batch)
    trial.stage = "calibration"
    quant.set_fake_quant_state(qat, "qat")
    out = qat(x)
    loss = F.cross_entropy(out, torch.arange(len(x)) % out.shape[-1]) if out.dim() == 2 else out.square().mean()
    loss.backward()
    if not torch.isfinite(loss) or any(p.grad is not None and not torch.isfinite(p.grad).all()
                                       for p in qat.parameters()):
        raise RuntimeError("non-finite QAT loss or gradient")
    qat.zero_grad(set_to_none=True)
    trial.stage = "qat_step"
    quant.set_fake_quant_state(qat, "validation")
    with torch.no_grad():
        trial.cos_qat = cosine(qat(x), reference)
    qmodel = quant.convert(qat)
    del qat
    with torch.no_grad():
        quantized = qmodel(x)
    trial.cos_quantized = cosine(quantized, reference)
    trial.stage = "convert"
    report = backend.check_model(qmodel, (x,), march=march)
    if not report.deployable:
        raise RuntimeError(str(report).replace("\n", " "))
    trial.stage = "check"
    program = report.program
    trial.stage = "compile"
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        loaded = backend.load(program.save(Path(folder) / "m.hir"))
        trial.bit_exact = (torch.equal(program.run(x), quantized) and torch.equal(loaded.run(x), quantized)
                           and torch.equal(program.run(x[:1]), qmodel(x[:1])))
    if not trial.bit_exact:
        raise RuntimeError("the program differs from the quantized model")
    trial.stage = "bit_exact"
