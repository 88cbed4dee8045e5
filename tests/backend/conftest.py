"""Quantized models for the backend tests: prepare, calibrate on the given batches, convert."""
from __future__ import annotations

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
