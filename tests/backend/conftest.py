"""Quantized models for the backend tests: prepare, calibrate on the given batches, convert."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch
from torch import nn

from hat import quant


def calibrate_and_convert(model: nn.Module, batches: list[torch.Tensor], qconfig_dict: Optional[dict] = None,
                          fx: bool = False) -> nn.Module:
    qat = (quant.prepare_qat_fx(model, qconfig_dict, example_inputs=(batches[0],)) if fx
           else quant.prepare_qat(model, qconfig_dict))
    return quant.convert(calibrate(qat, batches))


def calibrate(qat: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """Observe the batches in eval mode, then leave the model in the validation state."""
    quant.set_fake_quant_state(qat, "calibration")
    qat.eval()
    with torch.no_grad():
        for x in batches:
            qat(x)
    quant.set_fake_quant_state(qat, "validation")
    return qat


@pytest.fixture
def quantized():
    return calibrate_and_convert


def run_quantized_onnx(qmodel: nn.Module, x: torch.Tensor, folder) -> torch.Tensor:
    """The quantized model exported in QDQ form and run by onnxruntime at basic graph optimization (its full level
    swaps QDQ groups for its own integer kernels, which drift tens of steps: README, ONNX)."""
    import onnxruntime as ort

    from hat.quant.onnx_helper import export_quantized_onnx

    path = export_quantized_onnx(qmodel, (x,), Path(folder) / "m.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
