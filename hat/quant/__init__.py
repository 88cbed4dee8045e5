"""Quantization-aware training for J5 ("bayes"): observers, fake quantization, qconfigs.

Public names follow ../shared/DESIGN.md (users come from PyTorch's quantization API and the reference toolchain).
"""
from hat.quant.fake_quantize import FakeQuantize, LSQFakeQuantize, PACTFakeQuantize, set_fake_quant_state
from hat.quant.march import get_march, set_march
from hat.quant.qconfig import (QConfig, get_default_qat_out_qconfig, get_default_qat_qconfig, qconfig_report,
                               resolve_qconfigs)
from hat.quant.observer import (MinMaxObserver, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver,
                                PerChannelMinMaxObserver)

__all__ = ["QConfig", "get_default_qat_qconfig", "get_default_qat_out_qconfig", "qconfig_report", "resolve_qconfigs",
           "FakeQuantize", "LSQFakeQuantize", "PACTFakeQuantize", "set_fake_quant_state", "get_march", "set_march",
           "MinMaxObserver", "MovingAverageMinMaxObserver", "MovingAveragePerChannelMinMaxObserver",
           "PerChannelMinMaxObserver"]
