"""The module table: each module-level operator as data (which float modules it takes, its QAT module, how convert
builds its quantized module), read by prepare_qat (float -> QAT) and convert (QAT -> quantized).

Adding a module-level op = one `ModuleOp` here; its integer kernel lives in hat/integer/kernels.py, its checker
rule in hat/backend/j5/schema.py and its ONNX form in hat/backend/j5/onnx_qdq.py, each keyed by the kernel name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from hat.quant import elementwise, prelu, softmax
from hat.quant import batch_norm
from hat.quant import layer_norm
from hat.quant.fuse import FusedLayer
from hat.quant.qat import QATConv2d, QATDeQuantStub, QATFloatFunctional, QATLinear, QATQuantStub, _QATWeighted
from hat.quant.qconfig import QConfig
from hat.quant.quantized import (QuantizedConv2d, QuantizedDeQuantStub, QuantizedFloatFunctional, QuantizedLinear,
                                 QuantizedQuantStub)
from hat.quant.stubs import DeQuantStub, FloatFunctional, QuantStub


@dataclass(frozen=True)
class ModuleOp:
    """One operator at module level: float module -> QAT module -> quantized module."""

    name: str
    takes: Callable[[nn.Module], bool]  # is this float module the op?
    to_qat: Callable[[nn.Module, QConfig], nn.Module]
    qat: type  # what to_qat makes: convert finds the op by it
    to_quantized: Callable[[nn.Module], nn.Module]  # QAT module (observed, calibrated) -> quantized module
    doc: str = ""  # which float modules, for docs/ops.md


def _layer_of(kind: type) -> Callable[[nn.Module], bool]:
    return lambda m: isinstance(m, kind) or (isinstance(m, FusedLayer) and isinstance(m.layer, kind))


def _weighted_qat(cls: type) -> Callable[[nn.Module, QConfig], nn.Module]:
    return lambda m, qconfig: cls(m if isinstance(m, FusedLayer) else FusedLayer(m), qconfig)


def _weighted_quantized(cls: type) -> Callable[[_QATWeighted], nn.Module]:
    def convert(qat: _QATWeighted) -> nn.Module:
        weight, bias = qat.deploy_weight_and_bias()
        fq = qat.activation_post_process
        out_scale, out_dtype = (fq.current_scale(), fq.dtype) if fq is not None else (None, "qint32")
        return cls(qat.layer, weight, bias, qat.weight_fake_quant.current_scale(), out_scale, out_dtype,
                   qat.activation, qat.profile)

    return convert


def _observed(cls: type) -> Callable[[nn.Module], nn.Module]:
    """A quantized module made from its QAT module's observed output scale and dtype, and its march."""
    return lambda qat: cls(qat.activation_post_process.current_scale(), qat.activation_post_process.dtype,
                           qat.profile)


MODULE_OPS: tuple[ModuleOp, ...] = (
    ModuleOp("conv2d", _layer_of(nn.Conv2d), _weighted_qat(QATConv2d), QATConv2d, _weighted_quantized(QuantizedConv2d),
             "`nn.Conv2d` (+ `nn.BatchNorm2d` folded, + `nn.ReLU`/`nn.ReLU6` fused)"),
    ModuleOp("linear", _layer_of(nn.Linear), _weighted_qat(QATLinear), QATLinear, _weighted_quantized(QuantizedLinear),
             "`nn.Linear` (+ `nn.BatchNorm1d` folded, + `nn.ReLU`/`nn.ReLU6` fused)"),
    ModuleOp("quantize", lambda m: isinstance(m, QuantStub), lambda m, qconfig: QATQuantStub(qconfig), QATQuantStub,
             _observed(QuantizedQuantStub), "`hat.quant.QuantStub` (prepare_qat_fx adds one per input)"),
    ModuleOp("dequantize", lambda m: isinstance(m, DeQuantStub), lambda m, qconfig: QATDeQuantStub(),
             QATDeQuantStub, lambda qat: QuantizedDeQuantStub(),
             "`hat.quant.DeQuantStub` (prepare_qat_fx adds one per output)"),
    ModuleOp("float_functional", lambda m: isinstance(m, FloatFunctional),
             lambda m, qconfig: QATFloatFunctional(qconfig), QATFloatFunctional, _observed(QuantizedFloatFunctional),
             "`hat.quant.FloatFunctional`: add, sub, mul, add_scalar, mul_scalar, cat, maximum, minimum, matmul of "
             "activations (prepare_qat_fx rewrites `x + y`, `x + 1`, `torch.cat`, `a @ b`, attention, ...)"),
    ModuleOp("elementwise", lambda m: elementwise.table_op(m) is not None, elementwise.qat_module,
             elementwise.QATElementwise, elementwise.quantized_module,
             "the nn modules of the element-wise table below, and `hat.quant.ElementwiseOp`"),
    ModuleOp("prelu", lambda m: isinstance(m, nn.PReLU), prelu.qat_module, prelu.QATPReLU, prelu.quantized_module,
             "`nn.PReLU` (one slope or one per channel; prepare_qat_fx rewrites `F.prelu(x, weight)`): exact "
             "piecewise-linear kernel, the slope keeps training in QAT"),
    ModuleOp("softmax", lambda m: softmax.softmax_of(m) is not None, softmax.qat_module, softmax.QATSoftmax,
             softmax.quantized_module,
             "`nn.Softmax`, `nn.LogSoftmax`, `nn.Softmax2d` and `hat.quant.softmax.SoftmaxOp` (prepare_qat_fx "
             "rewrites `F.softmax`, `torch.softmax`, `x.softmax` and the log_softmax calls) over a non-batch dim: "
             "exp table of x - max, int32 sum, mantissa table (`softmax_lut`)"),
    ModuleOp("batch_norm", batch_norm.takes(nn.BatchNorm2d), batch_norm.qat_module, batch_norm.QATBatchNorm2d,
             _weighted_quantized(QuantizedConv2d),
             "`nn.BatchNorm2d` that no conv precedes (+ `nn.ReLU`/`nn.ReLU6`/`F.relu` fused; prepare_qat_fx rewrites "
             "`F.batch_norm` on a batch norm's own tensors, e.g. timm's `BatchNormAct2d`): a depthwise 1x1 `conv2d` "
             "(groups=C, unit weight) with the batch norm folded in (hat/quant/batch_norm.py)"),
    ModuleOp("batch_norm1d", batch_norm.takes(nn.BatchNorm1d), batch_norm.qat_module, batch_norm.QATBatchNorm1d,
             _weighted_quantized(batch_norm.QuantizedBatchNorm1d),
             "`nn.BatchNorm1d` that no linear precedes, on (N, C) or (N, C, L) (+ relu/relu6 fused): the same "
             "depthwise `conv2d` between `layout` reshapes; int8/int16 output"),
    ModuleOp("layer_norm", layer_norm.takes, layer_norm.qat_module, layer_norm.QATLayerNorm,
             layer_norm.quantized_module,
             "`nn.LayerNorm` over the last dim(s) and `nn.GroupNorm` (prepare_qat_fx rewrites `F.layer_norm` / "
             "`F.group_norm` on the model's parameters, e.g. torchvision's `LayerNorm2d`): integer mean and variance, "
             "rsqrt mantissa table, per-channel affine (`layer_norm`, hat/quant/layer_norm.py)"),
)
_BY_QAT_TYPE = {op.qat: op for op in MODULE_OPS}


def float_op(module: nn.Module) -> Optional[ModuleOp]:
    """The table entry that prepare_qat swaps `module` by, or None (the module stays as it is)."""
    return next((op for op in MODULE_OPS if op.takes(module)), None)


def qat_op(module: nn.Module) -> Optional[ModuleOp]:
    """The table entry whose QAT module `module` is, or None."""
    return _BY_QAT_TYPE.get(type(module))
