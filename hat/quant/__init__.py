"""Quantization-aware training for J5 ("bayes"): observers, fake quantization, qconfigs.

Public names follow ../shared/DESIGN.md (users come from PyTorch's quantization API and the reference toolchain).
"""
from hat.quant.fake_quantize import FakeQuantize, LSQFakeQuantize, PACTFakeQuantize, set_fake_quant_state
from hat.quant.march import get_march, set_march
from hat.quant.observer import (MinMaxObserver, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver,
                                PerChannelMinMaxObserver)

__all__ = ["FakeQuantize", "LSQFakeQuantize", "PACTFakeQuantize", "set_fake_quant_state", "get_march", "set_march",
           "MinMaxObserver", "MovingAverageMinMaxObserver", "MovingAveragePerChannelMinMaxObserver",
           "PerChannelMinMaxObserver"]
