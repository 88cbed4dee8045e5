"""Quantized modules: integer weights, int32 bias and accumulators, J5 requantization (int16 multiplier,
round-half-up shift, saturation). They compute on QTensors in quantized mode (integer data).

Each forward resolves its integer parameters (bias on the accumulator grid, multipliers, shifts) against its input
scale and runs one kernel of hat.integer.kernels through `apply`: what backend.compile records and the integer
program replays.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from hat.integer import fast
from hat.integer.arith import multiplier_and_shift, round_half_up, saturate
from hat.integer.kernels import along_axis
from hat.integer.profile import Profile, qrange
from hat.quant.fuse import FUSED_UPPER_BOUND
from hat.quant.stubs import FunctionalMethods
from hat.quant.qtensor import NamedQuantModule, QTensor, apply, dequantize_output, quantize


class QuantizedQuantStub(NamedQuantModule):
    def __init__(self, scale: torch.Tensor, dtype: str, profile: Profile):
        super().__init__()
        self.dtype, self.profile = dtype, profile
        self.register_buffer("scale", scale.detach().clone().reshape(1))

    def forward(self, x):
        return x if isinstance(x, QTensor) else quantize(x, self.scale, self.dtype, self.hat_name,
                                                         profile=self.profile)


class QuantizedDeQuantStub(NamedQuantModule):
    def forward(self, x):
        return dequantize_output(x, self.hat_name)


class _QuantizedWeighted(NamedQuantModule):
    """int8 per-channel weight, bias folded from BN; bias and output scale resolved against the input scale."""

    def __init__(self, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, weight_scale: torch.Tensor,
                 out_scale: torch.Tensor | None, out_dtype: str, activation: str | None, profile: Profile):
        super().__init__()
        self.layer_args, self.profile = _layer_args(layer), profile
        qmin, qmax = qrange(profile.weight_dtype)
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
    op = ""  # the kernel

    def integer_params(self, x: QTensor) -> dict:
        """Everything the kernel needs besides the input's integers, resolved against the input's scale."""
        acc_scale = x.scale.double() * self.weight_scale.double()
        params = {"weight": self.weight_int, "bias": self.integer_bias(x.scale), **self.layer_args,
                  "relu": self.activation is not None,
                  "multiplier": None, "shift": None, "acc_max": None, "out_max": None, "out_dtype": self.out_dtype}
        upper = FUSED_UPPER_BOUND[self.activation] if self.activation is not None else None
        if self.out_scale is None:  # high-precision output: the accumulator itself
            if upper is not None:
                params["acc_max"] = round_half_up(upper / acc_scale).long()
            return params
        params["multiplier"], params["shift"] = multiplier_and_shift(acc_scale / self.out_scale.double(), self.profile)
        if upper is not None:
            params["out_max"] = int(round_half_up(torch.tensor(upper / float(self.out_scale))))
        return params

    def forward(self, x) -> QTensor:
        (x,) = self._qinputs(x)
        params, execute = self._prepared(x)
        if self.out_scale is None:
            acc_scale = (x.scale.double() * self.weight_scale.double()).float()
            return apply(self.op, [x], params, acc_scale, "qint32", self.hat_name, axis=self.channel_axis,
                         execute=execute)
        return apply(self.op, [x], params, self.out_scale, self.out_dtype, self.hat_name, execute=execute)

    def _prepared(self, x: QTensor) -> tuple[dict, fast.Executor]:
        """The integer params and the fast executor (weights prepacked) for x's grid, kept while x's scale and dtype
        and the module's buffers stay what they were: an eval loop resolves and packs once."""
        buffers = (self.weight_int, self.bias, self.weight_scale, self.out_scale)
        key = (x.dtype, x.data.device, tuple(x.scale.reshape(-1).tolist()),
               tuple((id(b), b._version) for b in buffers if b is not None))
        if getattr(self, "_prepared_key", None) != key:
            params = self.integer_params(x)
            self._prepared_key, self._prepared_value = key, (params, fast.prepare(self.op, params))
        return self._prepared_value


class QuantizedConv2d(_QuantizedWeighted):
    op = "conv2d"


class QuantizedLinear(_QuantizedWeighted):
    channel_axis = -1
    op = "linear"


class QuantizedFloatFunctional(FunctionalMethods, NamedQuantModule):
    """add/sub/mul/cat/maximum/minimum/scalar ops on integers, each ending in one requantization to the observed output scale.

    add (public J5 form): acc = (x << shift) + y * qscale with an int16 qscale = round(s_y * 2^shift / s_x),
    x being the operand with the larger scale; then requantize acc (scale s_x / 2^shift) to the output scale.
    """

    def __init__(self, out_scale: torch.Tensor, out_dtype: str, profile: Profile):
        super().__init__()
        self.out_dtype, self.profile = out_dtype, profile
        self.register_buffer("out_scale", out_scale.detach().clone().reshape(1))

    def _out(self, op: str, inputs: list[QTensor], acc_scale: torch.Tensor, **params) -> QTensor:
        """Kernel `op`, its accumulator (scale `acc_scale`) requantized to the observed output scale."""
        multiplier, shift = multiplier_and_shift(acc_scale.double() / self.out_scale.double(), self.profile)
        params.update(multiplier=int(multiplier), shift=int(shift), out_dtype=self.out_dtype)
        return apply(op, inputs, params, self.out_scale, self.out_dtype, self.hat_name)

    def _add_shift(self, x: QTensor, ratio: float = 0.0) -> int:
        """The left shift of the add: within the march's limit, small enough that qscale = ratio * 2^shift fits
        the int16 multiplier and that the output requantization keeps a full-width multiplier."""
        profile = self.profile
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
        return self._out("add", [x, y], x.scale / 2 ** shift, x_shift=shift, x_sign=sign_x, y_multiplier=qscale)

    def _add(self, x, y):
        return self._aligned_sum(*self._qinputs(x, y), 1)

    def _sub(self, x, y):
        return self._aligned_sum(*self._qinputs(x, y), -1)

    def _mul(self, x, y):
        x, y = self._qinputs(x, y)
        return self._out("mul", [x, y], x.scale * y.scale)

    def _add_scalar(self, x, value: float):
        (x,) = self._qinputs(x)
        shift = self._add_shift(x)
        constant = int(round_half_up(torch.tensor(value / float(x.scale) * 2 ** shift, dtype=torch.float64)))
        return self._out("add_scalar", [x], x.scale / 2 ** shift, x_shift=shift, constant=constant)

    def _mul_scalar(self, x, value: float):
        (x,) = self._qinputs(x)
        return self._out("mul_scalar", [x], x.scale * abs(value), sign=-1 if value < 0 else 1)

    def _cat(self, tensors, dim: int = 0):
        tensors = self._qinputs(*tensors)
        return apply("cat", tensors, {"dim": dim, **self._to_output_grid(tensors)}, self.out_scale, self.out_dtype,
                     self.hat_name)

    def _matmul(self, x, y):
        """x @ y: integer products summed exactly (int32 on the device; the checker refuses a K and dtypes that can
        overflow it), then one requantization by s_x * s_y / s_out."""
        x, y = self._qinputs(x, y)
        return self._out("matmul", [x, y], x.scale * y.scale)

    def _maximum(self, x, y):
        return self._extremum(x, y, minimum=False)

    def _minimum(self, x, y):
        return self._extremum(x, y, minimum=True)

    def _extremum(self, x, y, minimum: bool) -> QTensor:
        """Both operands requantized to the output scale, then the element-wise max (or min)."""
        tensors = self._qinputs(x, y)
        params = {"minimum": minimum, **self._to_output_grid(tensors)}
        return apply("extremum", tensors, params, self.out_scale, self.out_dtype, self.hat_name)

    def _to_output_grid(self, tensors: list[QTensor]) -> dict:
        """Each input's multiplier and shift onto the output scale."""
        pairs = [multiplier_and_shift(t.scale.double() / self.out_scale.double(), self.profile) for t in tensors]
        return {"multipliers": [int(m) for m, _ in pairs], "shifts": [int(n) for _, n in pairs],
                "out_dtype": self.out_dtype}


def _layer_args(layer: nn.Module) -> dict:
    if isinstance(layer, nn.Conv2d):
        return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": layer.groups}
    return {}

