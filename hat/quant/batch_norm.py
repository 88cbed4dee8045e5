"""A batch norm that does not follow a conv/linear (DenseNet's pre-activation `norm -> relu -> conv`, a BN after an
add or a pool, timm's BatchNormAct2d): a per-channel integer scale + bias, deployed as the existing `conv2d` kernel.

The float batch norm becomes a depthwise 1x1 conv with unit weight (`groups=C`) FUSED with that batch norm
(`FusedLayer(identity_conv, bn, activation)`), and its QAT module is a `QATConv2d` over it: the batch norm is folded
into the per-channel int8 weight (batch statistics in training, running statistics in eval and in the deployed
layer), the bias is int32, the output is requantized, a following relu/relu6 is the conv's fused clip. convert makes
a `QuantizedConv2d` (groups=C): the program, the checker and the ONNX export see a depthwise conv, no new kernel.

The identity conv's weight is a constant: a non-persistent buffer of ones (not a parameter, not in the state_dict),
so training changes only the batch norm's gamma and beta (and its running statistics).

int8 weight of the folded batch norm: channel c's folded weight is the single number f_c = gamma_c / sqrt(var_c +
eps), quantized per output channel with the observed scale |f_c| / 127.5 (the J5 divisor of a symmetric int8 range):
every channel is +-127 steps whatever gamma and the statistics are (f_c / scale = +-127.5, rounded half up and
saturated: +127, or -127 for a negative f_c). The deployed weight is then 127 / 127.5 * f_c (0.39 % smaller); the
int32 bias is beta - mean * f_c on the accumulator grid, and the rest of the error is the output requantization.
As for every folded conv here, QAT training takes the running statistics of the conv output with the quantized
weight, i.e. of 127/127.5 * x, and the eval/deployed layer divides by them: once QAT has updated the statistics
(and the weight observer has seen the folded weight with them) the 127/127.5 cancels (measured gain 0.99999 after
three train-mode steps with momentum 1). With statistics from float training only (calibration, no QAT step) the
layer keeps the 0.39 % smaller gain. QAT and the quantized model agree either way: they share the weight grid.

`nn.BatchNorm1d` on (N, C) or (N, C, L) inputs: the same conv on (N, C, 1, 1) / (N, C, L, 1), the quantized module
reshapes around it (`layout` nodes in the program). Its output must be int8/int16 (not the high-precision int32
output, which only a DeQuantStub may take, and the reshape back is an op on it).

Eager models: a conv -> BN outside an nn.Sequential that `fuse_modules` does not name is now this op after the conv
(it runs, but it is one more layer and one more requantization: fuse it). prepare_qat_fx fuses every such chain.

state_dict: a standalone batch norm `norm` of the float model becomes `norm.bn.weight`, `norm.bn.bias`,
`norm.bn.running_mean`, `norm.bn.running_var`, `norm.bn.num_batches_tracked` (+ `norm.weight_fake_quant.*`,
`norm.activation_post_process.*`) in the prepared model. Float checkpoints load into the float model before
prepare_qat (hat/engine/quant_stages.py), so they are unaffected; QAT checkpoints are written and read by prepared
models.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hat.quant.fuse import FusedLayer
from hat.quant.qat import QATConv2d
from hat.quant.qconfig import QConfig
from hat.quant.qtensor import QTensor, QuantizationError
from hat.quant.quantized import QuantizedConv2d

BATCH_NORMS = (nn.BatchNorm2d, nn.BatchNorm1d)
_BATCH_NORM_FORWARD = nn.BatchNorm2d.forward  # nn.modules.batchnorm._BatchNorm.forward


def _parts(module: nn.Module) -> tuple[nn.Module, Optional[str]]:
    """(batch norm, fused activation) of a standalone batch norm or of FusedLayer(bn, None, activation)."""
    return (module.layer, module.activation) if isinstance(module, FusedLayer) else (module, None)


def takes(kind: type):
    """The table's test: a `kind` batch norm that prepare_qat meets unfused (the conv/linear fusion runs first, so
    every batch norm still there is standalone), alone or with its relu (FusedLayer(bn, None, activation))."""
    return lambda m: isinstance(_parts(m)[0], kind)


def identity_conv(bn: nn.Module) -> nn.Conv2d:
    """Depthwise 1x1 conv (groups=C) with a constant unit weight: a non-persistent buffer, no parameter."""
    reference = bn.running_mean if bn.running_mean is not None else bn.weight
    channels = bn.num_features
    conv = nn.Conv2d(channels, channels, 1, groups=channels, bias=False, device="meta")  # no RNG, no init
    del conv.weight
    conv.register_buffer("weight", torch.ones(channels, 1, 1, 1, device=reference.device, dtype=reference.dtype),
                         persistent=False)
    return conv


def _checked(bn: nn.Module, name: str) -> nn.Module:
    if type(bn).forward is not _BATCH_NORM_FORWARD:
        base = next(kind for kind in BATCH_NORMS if isinstance(bn, kind)).__name__
        raise QuantizationError(
            f"{type(bn).__name__} subclasses nn.{base} and overrides forward; its QAT version would drop the extra "
            f"ops of that forward (e.g. timm's BatchNormAct2d activation). Use prepare_qat_fx (it rewrites the "
            f"forward's F.batch_norm into a plain batch norm), or hold a plain batch norm and the activation as "
            f"submodules")
    if not bn.track_running_stats:
        raise QuantizationError(f"{name} with track_running_stats=False cannot be deployed: the device needs fixed "
                                f"statistics; enable running statistics")
    return bn


class QATBatchNorm2d(QATConv2d):
    """A standalone nn.BatchNorm2d (+ relu/relu6): QATConv2d over FusedLayer(identity_conv, bn, activation)."""

    def __init__(self, bn: nn.Module, activation: Optional[str], qconfig: QConfig):
        super().__init__(FusedLayer(identity_conv(bn), bn, activation), qconfig)


class QATBatchNorm1d(QATBatchNorm2d):
    """A standalone nn.BatchNorm1d on (N, C) or (N, C, L): the same conv on (N, C, 1, 1) / (N, C, L, 1)."""

    def _compute(self, x, weight, bias):
        if x.dim() not in (2, 3):
            raise QuantizationError(f"'{self.hat_name}': BatchNorm1d takes (N, C) or (N, C, L), got a {x.dim()}-dim "
                                    f"input of shape {list(x.shape)}")
        y = F.conv2d(x.reshape(x.shape[0], x.shape[1], -1, 1), weight, bias, groups=self.layer.groups)
        return y.reshape(x.shape)


class QuantizedBatchNorm1d(QuantizedConv2d):
    """QuantizedConv2d between two reshapes: (N, C[, L]) -> (N, C, L or 1, 1) -> conv2d -> back."""

    def forward(self, x) -> QTensor:
        (x,) = self._qinputs(x)
        if x.dim() not in (2, 3):
            raise QuantizationError(f"'{self.hat_name}': BatchNorm1d takes (N, C) or (N, C, L), got a {x.dim()}-dim "
                                    f"input of shape {list(x.shape)}")
        if x.dim() == 2:
            return super().forward(x.unsqueeze(-1).unsqueeze(-1)).flatten(1)
        return super().forward(x.unsqueeze(-1)).flatten(2)


def qat_module(module: nn.Module, qconfig: QConfig) -> nn.Module:
    bn, activation = _parts(module)
    name = f"a {type(bn).__name__}" + (f" ({module.hat_source})" if getattr(module, "hat_source", "") else "")
    _checked(bn, name)
    if isinstance(bn, nn.BatchNorm1d):
        if qconfig.activation is None:
            raise QuantizationError(f"{name} that no linear precedes needs an int8/int16 output qconfig "
                                    f"(get_default_qat_qconfig), not the high-precision one: its output is reshaped")
        return QATBatchNorm1d(bn, activation, qconfig)
    return QATBatchNorm2d(bn, activation, qconfig)
