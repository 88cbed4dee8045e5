"""QTensor ops that keep the input's grid or derive their scale from it: mean and sum over dims (the SE pattern
`x.mean((2, 3), keepdim=True)`), clamp/clip with constants, torch.div by a number. Registered on import (hat.quant
imports this module)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from hat.quant.qtensor import QTensor, QuantizationError, _register, apply
from hat.quant.qtensor_ops import requantized_mean

Dims = Union[int, Sequence[int], None]


def _reduced_dims(x: QTensor, dim: Dims, op: str) -> list[int]:
    """`dim` as sorted non-negative dims; the batch dim cannot be reduced (a program runs on any batch)."""
    dims = list(range(x.ndim)) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    dims = sorted({d % x.ndim for d in dims})
    if 0 in dims:
        raise QuantizationError(f"{op} over the batch dim of a QTensor (from '{x.producer or '?'}'): the integer "
                                f"program runs on any batch size; reduce over the other dims only")
    return dims


@_register(torch.mean, torch.Tensor.mean)
def _mean(x: QTensor, dim: Dims = None, keepdim: bool = False, *, dtype: Optional[torch.dtype] = None) -> QTensor:
    """Integer sums over `dim` times 1/count as the J5 multiplier and shift, on the input's scale."""
    dims = _reduced_dims(x, dim, "mean")
    count = math.prod(x.shape[d] for d in dims)
    sums = lambda d: d.sum(dim=dims, keepdim=keepdim)  # noqa: E731
    return requantized_mean(x, sums, count, "mean", {"dims": dims, "keepdim": keepdim})


@_register(torch.sum, torch.Tensor.sum)
def _sum(x: QTensor, dim: Dims = None, keepdim: bool = False, *, dtype: Optional[torch.dtype] = None) -> QTensor:
    """The mean times the count: the mean's integers on a scale count times larger (int8 cannot hold the sum)."""
    dims = _reduced_dims(x, dim, "sum")
    return _mean(x, dims, keepdim) * math.prod(x.shape[d] for d in dims)


@_register(torch.clamp, torch.Tensor.clamp, torch.clip, torch.Tensor.clip)
def _clamp(x: QTensor, min: Optional[float] = None, max: Optional[float] = None) -> QTensor:  # noqa: A002
    """clamp with Python numbers: the bounds on x's grid (rounded half up), saturated to its dtype."""
    if not all(bound is None or isinstance(bound, (int, float)) for bound in (min, max)):
        raise QuantizationError("clamp of a QTensor takes number bounds; for a tensor bound use "
                                "FloatFunctional.maximum / minimum")
    x = x._plain_op()
    low = None if min is None else x._const_steps(min)
    high = None if max is None else x._const_steps(max)
    if x.is_quantized:
        params = {"low": None if low is None else int(low), "high": None if high is None else int(high)}
        return apply("clip", [x], params, x.scale, x.dtype, x.producer)
    return x.with_data(x.clamp_to_range(x.data.clamp(min=low, max=high)))


@_register(torch.div, torch.true_divide, torch.divide, torch.Tensor.div, torch.Tensor.true_divide,
           torch.Tensor.divide)
def _div(x: QTensor, other, rounding_mode: Optional[str] = None) -> QTensor:
    """torch.div(x, c) as x / c: by a number it scales; by a tensor the error says how (a reciprocal table)."""
    if rounding_mode is not None:
        raise QuantizationError(f"division with rounding_mode='{rounding_mode}' of a QTensor (from "
                                f"'{x.producer or '?'}') is not an integer op here; divide without rounding_mode")
    return x / other
