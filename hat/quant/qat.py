"""QAT modules: what prepare_qat swaps in. Each produces a QTensor (fake-quantized values + scale + dtype).

A weighted layer folds its batch norm into the weight before the weight fake quant, exactly as the deployed
conv will hold it; in training mode the batch norm still normalizes with batch statistics (and updates its
running statistics), in eval mode or with frozen BN it uses the running statistics, i.e. the deployed arithmetic.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hat.integer.kernels import along_axis
from hat.integer.profile import get_profile
from hat.quant.fake_quantize import FakeQuantize, LSQFakeQuantize
from hat.quant.fuse import FusedLayer, fused_activation
from hat.quant.qconfig import QConfig
from hat.quant.stubs import FunctionalMethods
from hat.quant.qtensor import NamedQuantModule, QTensor, QuantizationError, dequantize_output


class _Named(NamedQuantModule):
    def _use_qconfig(self, qconfig: QConfig) -> None:
        """The march of the qconfig: the arithmetic this module's outputs (and convert's module) follow."""
        self.profile = get_profile(qconfig.march)

    def _output(self, fake_quant: nn.Module, y: torch.Tensor) -> QTensor:
        out = fake_quant(y)
        return QTensor(out, fake_quant.current_scale(), fake_quant.dtype, self.hat_name, profile=self.profile)

    def _input(self, x) -> torch.Tensor:
        return self._qinputs(x)[0].dequantize()


class QATQuantStub(_Named):
    def __init__(self, qconfig: QConfig):
        super().__init__()
        if qconfig.activation is None:
            raise QuantizationError("a QuantStub needs an activation qconfig (int8/int16), not a high-precision one")
        self._use_qconfig(qconfig)
        self.activation_post_process = qconfig.activation()

    def forward(self, x):
        return x if isinstance(x, QTensor) else self._output(self.activation_post_process, x)


class QATDeQuantStub(_Named):
    def forward(self, x):
        return dequantize_output(x, self.hat_name)


class QATFloatFunctional(FunctionalMethods, _Named):
    """Tensor-tensor arithmetic on QTensors, with the output scale observed by its own fake quant."""

    def __init__(self, qconfig: QConfig):
        super().__init__()
        if qconfig.activation is None:
            raise QuantizationError("a FloatFunctional needs an activation qconfig (int8/int16), not a "
                                    "high-precision one")
        self._use_qconfig(qconfig)
        self.activation_post_process = qconfig.activation()

    def _add(self, x, y):
        return self._output(self.activation_post_process, self._input(x) + self._input(y))

    def _sub(self, x, y):
        return self._output(self.activation_post_process, self._input(x) - self._input(y))

    def _mul(self, x, y):
        return self._output(self.activation_post_process, self._input(x) * self._input(y))

    def _add_scalar(self, x, value: float):
        return self._output(self.activation_post_process, self._input(x) + value)

    def _mul_scalar(self, x, value: float):
        return self._output(self.activation_post_process, self._input(x) * value)

    def _cat(self, tensors: Sequence, dim: int = 0):
        return self._output(self.activation_post_process, torch.cat([self._input(t) for t in tensors], dim))

    def _maximum(self, x, y):
        return self._output(self.activation_post_process, torch.maximum(self._input(x), self._input(y)))

    def _minimum(self, x, y):
        return self._output(self.activation_post_process, torch.minimum(self._input(x), self._input(y)))

    def _matmul(self, x, y):
        return self._output(self.activation_post_process, torch.matmul(self._input(x), self._input(y)))


class _QATWeighted(_Named):
    def __init__(self, fused: FusedLayer, qconfig: QConfig):
        super().__init__()
        self._use_qconfig(qconfig)
        self.layer, self.bn, self.activation = fused.layer, fused.bn, fused.activation
        self.weight_fake_quant = qconfig.weight()
        # no activation fake quant = high-precision (qint32) output, as the reference toolchain prints it
        self.activation_post_process = qconfig.activation() if qconfig.activation else None
        self.bn_frozen = False

    def forward(self, x) -> QTensor:
        inp = self._input(x)
        if self.bn is None or not self.bn.training:  # no BN, eval or frozen BN: exactly the deployed arithmetic
            weight, bias = self._folded()
            y = self._compute(inp, self.weight_fake_quant(weight), bias)
        else:  # training: the folded weight's fake quant (divided back by the BN factor), batch statistics
            y = self.bn(self._compute(inp, self._fake_quant_unfolded(), self.layer.bias))
        y = fused_activation(y, self.activation)
        if self.activation_post_process is None:
            return QTensor(y, torch.ones(1, device=y.device), "qint32", self.hat_name, profile=self.profile)
        return self._output(self.activation_post_process, y)

    def _fake_quant_unfolded(self) -> torch.Tensor:
        """fake_quant(W * f) / f, f = the BN factor per output channel: the weight on the deployed grid, in the
        units of the unfolded conv, so that batch norm can normalize its output with batch statistics."""
        weight, fake_quant = self.layer.weight, self.weight_fake_quant
        if type(fake_quant) in (FakeQuantize, LSQFakeQuantize) and fake_quant.ch_axis == 0:  # per output channel
            with torch.no_grad():  # the factor only sets the grid here: no autograd graph to build
                factor = self._bn_factor()
            return self.weight_fake_quant.forward_folded(weight, factor)
        factor = self._bn_factor()  # any other weight fake quant (per tensor, PACT, ...): fold, quantize, unfold
        safe = torch.where(factor == 0, torch.ones_like(factor), factor)
        return self.weight_fake_quant(weight * along_axis(factor, weight, 0)) / along_axis(safe, weight, 0)

    def deploy_weight_and_bias(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The float weight and bias the deployed layer computes with: batch norm folded in (running stats)."""
        weight, bias = self._folded()
        return weight.detach(), None if bias is None else bias.detach()

    def _bn_factor(self) -> torch.Tensor:
        gamma = self.bn.weight if self.bn.affine else torch.ones_like(self.bn.running_var)
        return gamma / torch.sqrt(self.bn.running_var + self.bn.eps)

    def _folded(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        weight, bias = self.layer.weight, self.layer.bias
        if self.bn is None:
            return weight, bias
        factor = self._bn_factor()
        beta = self.bn.bias if self.bn.affine else torch.zeros_like(factor)
        base = bias if bias is not None else torch.zeros_like(self.bn.running_mean)
        return weight * along_axis(factor, weight, 0), beta + (base - self.bn.running_mean) * factor

    def train(self, mode: bool = True):
        super().train(mode)
        if self.bn is not None and self.bn_frozen:
            self.bn.eval()  # frozen: running statistics, no updates
        return self


class QATConv2d(_QATWeighted):
    def _compute(self, x, weight, bias):
        conv = self.layer
        if conv.padding_mode != "zeros":
            raise QuantizationError(f"'{self.hat_name}': padding_mode='{conv.padding_mode}' is not supported on J5")
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class QATLinear(_QATWeighted):
    def _compute(self, x, weight, bias):
        return F.linear(x, weight, bias)


def freeze_bn(model: nn.Module) -> nn.Module:
    """Stop batch-norm statistics updates in every QAT layer (late in QAT, so the folded weights settle)."""
    for module in model.modules():
        if isinstance(module, _QATWeighted):
            module.bn_frozen = True
            module.train(module.training)
    return model
