"""Quantization-aware training for J5 ("bayes"): QTensor, observers, fake quant, qconfigs, prepare, convert.

Public names follow ../shared/DESIGN.md (users come from PyTorch's quantization API and the reference toolchain).
"""
from hat.quant import functional, qtensor_ops, qtensor_split, reductions  # noqa: F401  (they register QTensor ops)
from hat.quant.compare import compare
from hat.quant.convert import convert
from hat.quant.elementwise import ElementwiseOp
from hat.quant.fake_quantize import FakeQuantize, LSQFakeQuantize, PACTFakeQuantize, set_fake_quant_state
from hat.quant.fuse import fuse_modules
from hat.quant.fx import convert_fx, prepare_qat_fx
from hat.quant.march import get_march, set_march
from hat.quant.observer import (MinMaxObserver, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver,
                                PerChannelMinMaxObserver)
from hat.quant.prepare import prepare_qat
from hat.quant.qat import freeze_bn
from hat.quant.qconfig import (QConfig, get_default_qat_out_qconfig, get_default_qat_qconfig, qconfig_report,
                               resolve_qconfigs)
from hat.quant.qtensor import QTensor, QuantizationError
from hat.quant.softmax import SoftmaxOp
from hat.quant.stubs import DeQuantStub, FloatFunctional, QuantStub

__all__ = ["QTensor", "QuantizationError", "QuantStub", "DeQuantStub", "FloatFunctional",
           "MinMaxObserver", "MovingAverageMinMaxObserver", "PerChannelMinMaxObserver",
           "MovingAveragePerChannelMinMaxObserver", "FakeQuantize", "LSQFakeQuantize", "PACTFakeQuantize",
           "QConfig", "get_default_qat_qconfig", "get_default_qat_out_qconfig", "resolve_qconfigs", "qconfig_report",
           "set_march", "get_march", "fuse_modules", "prepare_qat", "prepare_qat_fx", "set_fake_quant_state",
           "freeze_bn", "convert", "convert_fx", "compare", "functional", "ElementwiseOp", "SoftmaxOp"]
