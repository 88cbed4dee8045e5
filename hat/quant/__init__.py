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
from hat.quant.compare import compare  # noqa: E402
from hat.quant.convert import convert  # noqa: E402
from hat.quant.fuse import fuse_modules  # noqa: E402
from hat.quant.fx import convert_fx, prepare_qat_fx  # noqa: E402
from hat.quant.prepare import prepare_qat  # noqa: E402
from hat.quant.qat import freeze_bn  # noqa: E402
from hat.quant.qtensor import QTensor, QuantizationError  # noqa: E402
from hat.quant.stubs import DeQuantStub, FloatFunctional, QuantStub  # noqa: E402

__all__ += ["compare", "convert", "convert_fx", "prepare_qat_fx", "fuse_modules", "prepare_qat", "freeze_bn", "QTensor", "QuantizationError", "QuantStub", "DeQuantStub",
            "FloatFunctional"]
