"""QTensor functions that split or move integers without arithmetic (the scale stays): chunk / split / unbind (each
piece one `index` node), swapaxes / swapdims (`layout` transpose), reshape_as / view_as (`layout` reshape / view),
roll (`layout` roll, shifts taken modulo the dim), F.pad with a constant (`pad`: the value rounded half up onto x's
grid and saturated). Registered on import (hat.quant imports this module, after qtensor_ops)."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from hat.integer import kernels
from hat.integer.arith import round_half_up
from hat.integer.profile import qrange
from hat.quant.qtensor import _HANDLERS, QTensor, QuantizationError, _register, apply

Ints = Union[int, Sequence[int]]


def _pieces(x: QTensor, dim: int, bounds: Sequence[tuple[int, int]]) -> tuple[QTensor, ...]:
    """x[..., start:stop, ...] along `dim` for each (start, stop): one `index` kernel per piece."""
    d = dim % x.ndim
    return tuple(x[(slice(None),) * d + (slice(start, stop),)] for start, stop in bounds)


def _by_sizes(sizes: Sequence[int]) -> list[tuple[int, int]]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(s, s + n) for s, n in zip(starts, sizes)]


@_register(torch.chunk, torch.Tensor.chunk)
def _chunk(x: QTensor, chunks: int, dim: int = 0) -> tuple[QTensor, ...]:
    """torch.chunk: pieces of ceil(size / chunks) (the last one smaller; fewer pieces when they run out)."""
    size = x.shape[dim]
    step = -(-size // chunks) if size else 1
    return _pieces(x, dim, [(s, min(s + step, size)) for s in range(0, size, step)])


@_register(torch.split, torch.Tensor.split, torch.Tensor.split_with_sizes)
def _split(x: QTensor, split_size_or_sections: Optional[Ints] = None, dim: int = 0, *,
           split_size: Optional[Ints] = None, split_sizes: Optional[Ints] = None) -> tuple[QTensor, ...]:
    """torch.split: pieces of one size (the last one smaller) or of the listed sizes (which must add up)."""
    split_size_or_sections = next(v for v in (split_size_or_sections, split_size, split_sizes) if v is not None)
    size = x.shape[dim]
    if isinstance(split_size_or_sections, int):
        step = split_size_or_sections
        return _pieces(x, dim, [(s, min(s + step, size)) for s in range(0, size, step)] or [(0, 0)])
    sizes = list(split_size_or_sections)
    if sum(sizes) != size:
        raise QuantizationError(f"split sizes {sizes} of a QTensor add up to {sum(sizes)}, but dim {dim} has {size}")
    return _pieces(x, dim, _by_sizes(sizes))


@_register(torch.unbind, torch.Tensor.unbind)
def _unbind(x: QTensor, dim: int = 0) -> tuple[QTensor, ...]:
    d = dim % x.ndim
    return tuple(x[(slice(None),) * d + (i,)] for i in range(x.shape[d]))


@_register(torch.swapaxes, torch.Tensor.swapaxes, torch.swapdims, torch.Tensor.swapdims)
def _swap(x: QTensor, axis0: int = None, axis1: int = None, **kwargs) -> QTensor:
    """swapaxes / swapdims: the program's `layout` transpose."""
    a, b = (axis0, axis1) if axis0 is not None else (kwargs.get("dim0"), kwargs.get("dim1"))
    return _HANDLERS[torch.Tensor.transpose](x, a, b)


@_register(torch.Tensor.reshape_as)
def _reshape_as(x: QTensor, other: Any) -> QTensor:
    return _HANDLERS[torch.Tensor.reshape](x, tuple(other.shape))


@_register(torch.Tensor.view_as)
def _view_as(x: QTensor, other: Any) -> QTensor:
    return _HANDLERS[torch.Tensor.view](x, tuple(other.shape))


@_register(torch.roll, torch.Tensor.roll)
def _roll(x: QTensor, shifts: Ints, dims: Optional[Ints] = None) -> QTensor:
    """torch.roll along given dims (`layout` roll), each shift taken modulo its dim (non-negative)."""
    if dims is None or (not isinstance(dims, int) and len(dims) == 0):
        raise QuantizationError(f"torch.roll of a QTensor (from '{x.producer or '?'}') without dims rolls the "
                                f"flattened tensor across the batch; give dims (torch.roll(x, shifts, dims=(2, 3)))")
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    dims = [dims] if isinstance(dims, int) else list(dims)
    if len(shifts) != len(dims):
        raise QuantizationError(f"torch.roll of a QTensor: {len(shifts)} shifts for {len(dims)} dims")
    dims = [d % x.ndim for d in dims]
    params = {"method": "roll", "args": [[s % max(x.shape[d], 1) for s, d in zip(shifts, dims)], dims], "kwargs": {}}
    return x._plain_op()._on_grid("layout", params, lambda d: kernels.layout(d, **params))


@_register(F.pad)
def _pad(x: QTensor, pad: Sequence[int], mode: str = "constant", value: Optional[float] = None) -> QTensor:
    """F.pad(x, pad, mode="constant", value): the value rounded half up onto x's grid and saturated to its dtype
    (`pad` kernel); other modes are refused."""
    if mode != "constant":
        raise QuantizationError(f"F.pad(mode='{mode}') on a QTensor (from '{x.producer or '?'}'): only "
                                f"mode='constant' is an integer op here; pad in float before the QuantStub, or use "
                                f"constant padding")
    x = x._plain_op()
    qmin, qmax = qrange(x.dtype)
    steps = 0 if not value else int(round_half_up(torch.tensor(float(value), dtype=torch.float64)
                                                  / x.scale.detach().double()).clamp(qmin, qmax))
    params = {"pads": [int(p) for p in pad], "value": steps}
    if x.is_quantized:
        return apply("pad", [x], params, x.scale, x.dtype, x.producer)
    return x.with_data(F.pad(x.data, params["pads"], mode="constant", value=steps * float(x.scale.detach())))
