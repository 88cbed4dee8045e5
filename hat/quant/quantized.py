"""Quantized modules: integer weights, int32 bias and accumulators, J5 requantization (int16 multiplier,
round-half-up shift, saturation). They compute on QTensors in quantized mode (integer data).

Integer convolutions run in float64, which is exact for every int8/int16 x int8 sum within the J5 limits
(|sum| < 2^53), then become int64.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hat.backend.j5.arith import requantize, round_half_up, saturate
from hat.quant.march import current_profile
from hat.quant.stubs import FunctionalMethods
from hat.quant.qtensor import TORCH_DTYPES, NamedQuantModule, QTensor, along_axis, dequantize, quantize


class QuantizedQuantStub(NamedQuantModule):
    def __init__(self, scale: torch.Tensor, dtype: str):
        super().__init__()
        self.dtype = dtype
        self.register_buffer("scale", scale.detach().clone().reshape(1))

    def forward(self, x):
        return x if isinstance(x, QTensor) else quantize(x, self.scale, self.dtype, self.hat_name)


class QuantizedDeQuantStub(NamedQuantModule):
    def forward(self, x):
        return dequantize(x)


class _QuantizedWeighted(NamedQuantModule):
    """int8 per-channel weight, bias folded from BN; bias and output scale resolved against the input scale."""

    def __init__(self, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, weight_scale: torch.Tensor,
                 out_scale: torch.Tensor | None, out_dtype: str, activation: str | None):
        super().__init__()
        self.layer_args = _layer_args(layer)
        qmin, qmax = current_profile().qrange(current_profile().weight_dtype)
        scale = weight_scale.detach().reshape(-1)
        per_channel = along_axis(scale, weight, 0)
        weight_int = round_half_up(weight.detach() / per_channel).clamp(qmin, qmax).to(torch.int8)
        self.register_buffer("weight_int", weight_int)
        self.register_buffer("weight_scale", scale.clone())
        self.register_buffer("bias", (bias if bias is not None else torch.zeros(len(scale))).detach().clone())
        self.register_buffer("out_scale", out_scale.detach().clone().reshape(1) if out_scale is not None else None)
        self.out_dtype, self.activation = out_dtype, activation

    def extra_repr(self) -> str:
        out = ("qint32 (high precision)" if self.out_scale is None
               else f"{self.out_dtype}, scale={float(self.out_scale):.6g}")
        return f"weight=int8{tuple(self.weight_int.shape)}, out={out}, activation={self.activation}, {self.layer_args}"

    def integer_bias(self, input_scale: torch.Tensor) -> torch.Tensor:
        """int32 bias on the accumulator's grid: bias / (input_scale * weight_scale[c]), rounded half up."""
        return saturate(round_half_up(self.bias.double() / (input_scale.double() * self.weight_scale.double())),
                        "qint32").long()

    channel_axis = 1  # where output channels are: 1 for convs (N, C, H, W), -1 for linears (..., C)

    def forward(self, x) -> QTensor:
        (x,) = self._qinputs(x)
        axis = self.channel_axis
        acc = torch.round(self._compute(x.data.double(), self.weight_int.double())).long()
        acc = acc + along_axis(self.integer_bias(x.scale), acc, axis)
        acc = saturate(acc, "qint32")  # the int32 accumulator
        if self.activation in ("relu", "relu6"):
            acc = acc.clamp(min=0)
        acc_scale = x.scale.double() * self.weight_scale.double()
        if self.out_scale is None:  # high-precision output: the accumulator itself
            if self.activation == "relu6":
                acc = torch.minimum(acc, along_axis(round_half_up(6.0 / acc_scale).long(), acc, axis))
            return QTensor(acc.to(torch.int32), acc_scale.float(), "qint32", self.hat_name, axis=axis)
        out = requantize(acc, acc_scale / self.out_scale.double(), self.out_dtype, channel_axis=axis)
        if self.activation == "relu6":
            out = out.clamp(max=int(round_half_up(torch.tensor(6.0 / float(self.out_scale)))))
        return QTensor(out.to(TORCH_DTYPES[self.out_dtype]), self.out_scale, self.out_dtype, self.hat_name)


class QuantizedConv2d(_QuantizedWeighted):
    def _compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight, None, **self.layer_args)


class QuantizedLinear(_QuantizedWeighted):
    channel_axis = -1
    def _compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)


class QuantizedFloatFunctional(FunctionalMethods, NamedQuantModule):
    """add/sub/mul/cat/scalar ops on integers, each ending in one requantization to the observed output scale.

    add (public J5 form): acc = (x << shift) + y * qscale with an int16 qscale = round(s_y * 2^shift / s_x),
    x being the operand with the larger scale; then requantize acc (scale s_x / 2^shift) to the output scale.
    """

    def __init__(self, out_scale: torch.Tensor, out_dtype: str):
        super().__init__()
        self.out_dtype = out_dtype
        self.register_buffer("out_scale", out_scale.detach().clone().reshape(1))

    def _out(self, acc: torch.Tensor, acc_scale: torch.Tensor) -> QTensor:
        q = requantize(acc, acc_scale.double() / self.out_scale.double(), self.out_dtype)
        return QTensor(q.to(TORCH_DTYPES[self.out_dtype]), self.out_scale, self.out_dtype, self.hat_name)

    def _add_shift(self, x: QTensor, ratio: float = 0.0) -> int:
        """The left shift of the add: within the march's limit, small enough that qscale = ratio * 2^shift fits
        the int16 multiplier and that the output requantization keeps a full-width multiplier."""
        profile = current_profile()
        room = profile.max_shift - 15 - math.ceil(math.log2(max(float(x.scale) / float(self.out_scale), 1e-30)))
        fits = math.floor(math.log2(profile.multiplier_max / ratio)) if ratio > 0 else profile.max_shift
        return max(0, min(profile.add_max_shift[x.dtype], fits, room))

    def _aligned_sum(self, x: QTensor, y: QTensor, sign: int) -> QTensor:
        if float(y.scale) > float(x.scale):
            x, y, sign_x, sign_y = y, x, sign, 1  # the larger scale is shifted; x - y = -(y) + x when swapped
        else:
            sign_x, sign_y = 1, sign
        ratio = float(y.scale) / float(x.scale)
        shift = self._add_shift(x, ratio)
        qscale = sign_y * int(round_half_up(torch.tensor(ratio * 2 ** shift, dtype=torch.float64)))
        acc = sign_x * (x.data.long() << shift) + y.data.long() * qscale
        return self._out(acc, x.scale / 2 ** shift)

    def _add(self, x, y):
        return self._aligned_sum(*self._qinputs(x, y), 1)

    def _sub(self, x, y):
        return self._aligned_sum(*self._qinputs(x, y), -1)

    def _mul(self, x, y):
        x, y = self._qinputs(x, y)
        return self._out(x.data.long() * y.data.long(), x.scale * y.scale)

    def _add_scalar(self, x, value: float):
        (x,) = self._qinputs(x)
        shift = self._add_shift(x)
        constant = int(round_half_up(torch.tensor(value / float(x.scale) * 2 ** shift, dtype=torch.float64)))
        return self._out((x.data.long() << shift) + constant, x.scale / 2 ** shift)

    def _mul_scalar(self, x, value: float):
        (x,) = self._qinputs(x)
        sign = -1 if value < 0 else 1
        return self._out(x.data.long() * sign, x.scale * abs(value))

    def _cat(self, tensors, dim: int = 0):
        parts = [requantize(t.data.long(), t.scale.double() / self.out_scale.double(), self.out_dtype)
                 for t in self._qinputs(*tensors)]
        return QTensor(torch.cat(parts, dim).to(TORCH_DTYPES[self.out_dtype]), self.out_scale, self.out_dtype,
                       self.hat_name)


def _layer_args(layer: nn.Module) -> dict:
    if isinstance(layer, nn.Conv2d):
        return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
    return {}

