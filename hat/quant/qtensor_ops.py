"""torch functions on QTensors whose result keeps the input's grid or has a fixed ratio to it: reshapes and the
other layout methods, relu/relu6/hardtanh, max and average pooling, nearest interpolation, cat of equal scales,
dropout (off). Each runs one integer kernel in quantized mode and the same rule on the grid values in QAT mode.
Registered on import (hat.quant imports this module)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from hat.integer import kernels
from hat.integer.arith import multiplier_and_shift, round_half_up
from hat.quant.qtensor import QTensor, QuantizationError, _needs_float_functional, _register, apply


def _layout(method: str) -> Callable:
    """torch.reshape(t, shape) and t.reshape(*shape) alike: the same method on `data` (integers or QAT values)."""

    def handler(x: QTensor, *args, **kwargs) -> QTensor:
        listed = lambda a: list(a) if isinstance(a, (tuple, torch.Size)) else a  # noqa: E731  (JSON-friendly)
        params = {"method": method, "args": [listed(a) for a in args],
                  "kwargs": {k: listed(v) for k, v in kwargs.items()}}
        return x._plain_op()._on_grid("layout", params, lambda d: kernels.layout(d, **params))

    return handler


for _name in kernels.LAYOUT_METHODS:
    _register(getattr(torch.Tensor, _name), *([getattr(torch, _name)] if hasattr(torch, _name) else []))(
        _layout(_name))


@_register(F.relu, torch.relu, torch.Tensor.relu)
def _relu(x: QTensor, inplace: bool = False) -> QTensor:
    return x._plain_op()._on_grid("clip", {"low": 0, "high": None}, lambda d: d.clamp(min=0))


@_register(F.max_pool2d, torch.max_pool2d)
def _max_pool(x: QTensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
              return_indices=False) -> QTensor:
    if return_indices:
        raise QuantizationError("max_pool2d(return_indices=True) on a QTensor: indices are not a quantized tensor")
    params = {"kernel_size": kernel_size, "stride": stride or kernel_size, "padding": padding, "dilation": dilation,
              "ceil_mode": ceil_mode}
    return x._plain_op()._on_grid("max_pool2d", params, lambda d: kernels.max_pool2d(d, **params))


@_register(F.dropout)
def _dropout(x: QTensor, p: float = 0.5, training: bool = False, inplace: bool = False) -> QTensor:
    return x  # dropout would leave the grid: off


@_register(F.hardtanh, F.relu6)
def _clip(x: QTensor, min_val: float = 0.0, max_val: float = 6.0, inplace: bool = False) -> QTensor:
    x = x._plain_op()
    low, high = x._const_steps(min_val), x._const_steps(max_val)
    if x.is_quantized:
        return apply("clip", [x], {"low": int(low), "high": int(high)}, x.scale, x.dtype, x.producer)
    return x.with_data(x.clamp_to_range(torch.minimum(torch.maximum(x.data, low), high)))


@_register(F.interpolate)
def _interpolate(x: QTensor, size=None, scale_factor=None, mode: str = "nearest", **kwargs) -> QTensor:
    if mode != "nearest":
        raise QuantizationError(f"interpolate(mode='{mode}') on a QTensor needs requantization; use mode='nearest'")
    params = {"size": list(size) if isinstance(size, tuple) else size,
              "scale_factor": list(scale_factor) if isinstance(scale_factor, tuple) else scale_factor}
    return x._plain_op()._on_grid("resize_nearest", params, lambda d: F.interpolate(d, size, scale_factor))


@_register(torch.cat, torch.concat)
def _cat(tensors, dim: int = 0) -> QTensor:
    first = tensors[0]
    if not all(isinstance(t, QTensor) for t in tensors) or any(
            t.dtype != first.dtype or not torch.equal(t.scale.detach(), first.scale.detach()) for t in tensors):
        raise _needs_float_functional("torch.cat", "cat")
    tensors = [t._plain_op() for t in tensors]
    if first.is_quantized:
        return apply("concat", tensors, {"dim": dim}, first.scale, first.dtype, first.producer)
    return first.with_data(torch.cat([t.data for t in tensors], dim))


@_register(F.adaptive_avg_pool2d)
def _global_average(x: QTensor, output_size) -> QTensor:
    if output_size not in (1, (1, 1), [1, 1]):
        raise QuantizationError(f"adaptive_avg_pool2d on a QTensor supports output size 1 (global), got {output_size}")
    area = x.shape[-1] * x.shape[-2]
    sums = lambda d: d.sum(dim=(-2, -1), keepdim=True)  # noqa: E731
    return requantized_mean(x, sums, area, "global_avg_pool", {})


@_register(F.avg_pool2d)
def _average(x: QTensor, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
             divisor_override=None) -> QTensor:
    if ceil_mode or (padding and not count_include_pad):
        raise QuantizationError("avg_pool2d on a QTensor needs windows of one size: ceil_mode=False, and "
                                "count_include_pad=True when padding")
    k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    area = divisor_override or k[0] * k[1]
    sums = lambda d: F.avg_pool2d(d, k, stride, padding, ceil_mode, True, divisor_override=1)  # noqa: E731
    window = {"kernel_size": list(k), "stride": stride or list(k), "padding": padding}
    return requantized_mean(x, sums, area, "avg_pool2d", window)


def requantized_mean(x: QTensor, window_sum: Callable, area: int, op: str, window: dict) -> QTensor:
    """Window sums (int32 on the device) times 1/area via the J5 multiplier and shift, on the input's scale.

    QAT applies the same effective ratio m / 2^n and rounding, so both modes agree."""
    x = x._plain_op()
    multiplier, shift = multiplier_and_shift(torch.tensor(1.0 / area, dtype=torch.float64), x.profile)
    if x.is_quantized:
        params = dict(window, multiplier=int(multiplier), shift=int(shift), out_dtype=x.dtype)
        return apply(op, [x], params, x.scale, x.dtype, x.producer)
    effective = float(multiplier) / 2.0 ** int(shift)
    steps = ste_round(window_sum(x.data) / x.step) * effective  # integer sums first, as on the device
    return x.with_data(ste_round(steps) * x.step)


def ste_round(v: torch.Tensor) -> torch.Tensor:
    """Round half up forward, identity backward."""
    return v + (round_half_up(v) - v).detach()
