"""LayerNorm and GroupNorm, int8 and int16 activations, in the three stages (issue 16).

float:     `nn.LayerNorm(normalized_shape, eps, elementwise_affine)` over the last dim(s) (ViT/Swin (N, L, C),
           ConvNeXt's channels-last (N, H, W, C); torchvision's `LayerNorm2d` permutes around one) and
           `nn.GroupNorm(G, C)` on (N, C, ...). prepare_qat_fx rewrites `F.layer_norm(x, shape, weight, bias, eps)` and
           `F.group_norm(x, G, weight, bias, eps)` on the model's own parameters into these modules (fx_modules.py),
           sharing the Parameters. A subclass with its own forward is not taken by the eager prepare_qat (its extra
           ops would be lost); prepare_qat_fx traces through it.
QAT:       `QATLayerNorm`: F.layer_norm / F.group_norm in float on the dequantized input with the float module's own
           weight and bias (they keep training), output fake-quantized with an observed scale.
quantized: `QuantizedLayerNorm`: one integer kernel, `kernels.layer_norm` (hat/integer/norm_kernels.py), the same for
           both: normalize over the dims from `start_dim` on, split into `groups` groups along it (LayerNorm: the
           normalized dims, 1 group; GroupNorm: dims 1..., G groups), then a per-element affine. Its parameters are
           built per input scale, dtype and shape with the module's profile (hat/integer/norm_tables.py): the sum S
           and the centred sum of squares Q in int64 (exact; the mean with F fraction bits, F as large as keeps
           n * 2^(2 (b + F)) < 2^63, b = 8 / 16 the input span), the variance round_half_up(Q / n) plus eps / s_in^2
           (same units), its rsqrt from a normalized-mantissa table (E = 2^e * m, e even, m in [1, 4): 769 entries
           2^15 / sqrt(m), interpolated over 8 bits), y = (x - mean) * rsqrt with 16 fraction bits (rounded half up),
           then gamma / s_out as the profile's int16 multiplier and shift and beta / s_out as an int32 bias on that
           shift, rounded half up and saturated to the output dtype. Everything integer at run time; the table and
           constants are computed at convert time in float64 and stored in the program, so program and module are
           bit-exact.
Accuracy against float64 layer norm of the same integers (random data, C in 16 / 96 / 768): int8 outputs within 0.51
of a step (mean 0.25); int16 outputs within ~1.8 steps (mean 0.26), set by the 15-bit table and the int16 multiplier.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hat.integer import norm_tables
from hat.integer.profile import Profile
from hat.quant.qat import _Named
from hat.quant.qconfig import QConfig
from hat.quant.qtensor import NamedQuantModule, QTensor, QuantizationError, apply

KERNEL = "layer_norm"


def takes(module: nn.Module) -> bool:
    """nn.LayerNorm / nn.GroupNorm, or a subclass that keeps their forward."""
    return any(isinstance(module, base) and type(module).forward is base.forward
               for base in (nn.LayerNorm, nn.GroupNorm))


class _Norm:
    """What LayerNorm and GroupNorm share: the float call and the kernel's layout for an input shape."""

    normalized_shape: Optional[tuple[int, ...]]  # LayerNorm
    num_groups: Optional[int]  # GroupNorm
    eps: float
    hat_name: str

    def _float(self, x: torch.Tensor, weight, bias) -> torch.Tensor:
        if self.num_groups is not None:
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)

    def _layout(self, shape: Sequence[int]) -> tuple[int, int, int, list[int]]:
        """(start_dim, groups, elements per group, affine shape) for an input of `shape`."""
        ndim = len(shape)
        if self.num_groups is not None:
            if ndim < 2 or shape[1] % self.num_groups:
                raise QuantizationError(f"module '{self.hat_name}': GroupNorm({self.num_groups}) on an input of "
                                        f"shape {list(shape)}; it takes (N, C, ...) with C divisible by the groups")
            count = shape[1] // self.num_groups * math.prod(shape[2:])
            return 1, self.num_groups, count, [shape[1]] + [1] * (ndim - 2)
        k = len(self.normalized_shape)
        if ndim <= k or tuple(shape[-k:]) != tuple(self.normalized_shape):
            raise QuantizationError(f"module '{self.hat_name}': LayerNorm{tuple(self.normalized_shape)} on an input "
                                    f"of shape {list(shape)}; the integer op normalizes the last dims within a "
                                    f"sample (a batch dim in front)")
        return ndim - k, 1, math.prod(self.normalized_shape), list(self.normalized_shape)

    def _describe(self) -> str:
        return (f"num_groups={self.num_groups}" if self.num_groups is not None
                else f"normalized_shape={tuple(self.normalized_shape)}") + f", eps={self.eps:g}"


def _norm_settings(module: nn.Module) -> tuple[Optional[tuple[int, ...]], Optional[int], float]:
    if isinstance(module, nn.GroupNorm):
        return None, module.num_groups, float(module.eps)
    return tuple(module.normalized_shape), None, float(module.eps)


class QATLayerNorm(_Norm, _Named):
    """F.layer_norm / F.group_norm on the dequantized input with the float module's weight and bias (trained), its
    output fake-quantized (observed scale)."""

    def __init__(self, module: nn.Module, qconfig: QConfig):
        super().__init__()
        if qconfig.activation is None:
            raise QuantizationError(f"{type(module).__name__}: a normalization needs an int8/int16 output qconfig, "
                                    f"not a high-precision one")
        self._use_qconfig(qconfig)
        self.normalized_shape, self.num_groups, self.eps = _norm_settings(module)
        self.weight, self.bias = module.weight, module.bias  # the same Parameters (or None): QAT trains them
        self.activation_post_process = qconfig.activation()

    def forward(self, x) -> QTensor:
        x = self._input(x)
        self._layout(x.shape)
        return self._output(self.activation_post_process, self._float(x, self.weight, self.bias))

    def extra_repr(self) -> str:
        return self._describe()


class QuantizedLayerNorm(_Norm, NamedQuantModule):
    """One layer_norm kernel; its parameters for an input scale, dtype and shape are built once (float64) and reused."""

    def __init__(self, normalized_shape, num_groups, eps: float, weight: Optional[torch.Tensor],
                 bias: Optional[torch.Tensor], out_scale: torch.Tensor, out_dtype: str, profile: Profile):
        super().__init__()
        self.normalized_shape, self.num_groups, self.eps = normalized_shape, num_groups, float(eps)
        self.out_dtype, self.profile = out_dtype, profile
        self.register_buffer("weight", None if weight is None else weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("out_scale", out_scale.detach().clone().reshape(1))
        self._params: dict[tuple, dict] = {}

    def forward(self, x) -> QTensor:
        (x,) = self._qinputs(x)
        return apply(KERNEL, [x], self.kernel_params(float(x.scale), x.dtype, tuple(x.shape[1:])), self.out_scale,
                     self.out_dtype, self.hat_name)

    def kernel_params(self, in_scale: float, in_dtype: str, sample_shape: tuple[int, ...]) -> dict:
        """The kernel's parameters for an input of `in_scale`, `in_dtype` and per-sample shape `sample_shape`."""
        key = (in_scale, in_dtype, sample_shape)
        if key not in self._params:
            start_dim, groups, count, affine = self._layout((1, *sample_shape))
            try:
                self._params[key] = norm_tables.layer_norm_params(
                    in_scale, in_dtype, float(self.out_scale), self.out_dtype, count=count, start_dim=start_dim,
                    groups=groups, eps=self.eps, weight=self.weight, bias=self.bias, affine_shape=affine,
                    profile=self.profile)
            except ValueError as exc:
                raise QuantizationError(f"module '{self.hat_name}': {exc}") from None
        return self._params[key]

    def extra_repr(self) -> str:
        return f"{self._describe()}, out={self.out_dtype}, scale={float(self.out_scale):.6g}"


def qat_module(module: nn.Module, qconfig: QConfig) -> QATLayerNorm:
    return QATLayerNorm(module, qconfig)


def quantized_module(module: QATLayerNorm) -> QuantizedLayerNorm:
    fake_quant = module.activation_post_process
    return QuantizedLayerNorm(module.normalized_shape, module.num_groups, module.eps, module.weight, module.bias,
                              fake_quant.current_scale(), fake_quant.dtype, module.profile)
