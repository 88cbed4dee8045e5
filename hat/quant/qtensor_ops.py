"""torch functions on QTensors whose result keeps the input's grid or has a fixed ratio to it: reshapes and the
other layout methods, relu/relu6/hardtanh, max and average pooling (any window: a divisor per output position),
nearest and bilinear interpolation, cat of equal scales, dropout (off). Each runs one integer kernel in quantized
mode and the same rule on the grid values in QAT mode. Registered on import (hat.quant imports this module)."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from hat.integer import kernels
from hat.integer.arith import multiplier_and_shift, round_half_up
from hat.integer.profile import qrange
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
def _interpolate(x: QTensor, size=None, scale_factor=None, mode: str = "nearest", align_corners=None,
                 recompute_scale_factor=None, antialias: bool = False) -> QTensor:
    if mode == "bilinear" and not antialias:
        return _bilinear(x, size, scale_factor, bool(align_corners), recompute_scale_factor)
    if mode != "nearest" or antialias:
        raise QuantizationError(f"interpolate(mode='{mode}'{', antialias=True' if antialias else ''}) on a QTensor "
                                f"is not an integer op here; use mode='nearest' or mode='bilinear' (antialias=False)")
    params = {"size": list(size) if isinstance(size, tuple) else size,
              "scale_factor": list(scale_factor) if isinstance(scale_factor, tuple) else scale_factor}
    return x._plain_op()._on_grid("resize_nearest", params, lambda d: F.interpolate(d, size, scale_factor))


def _bilinear(x: QTensor, size, scale_factor, align_corners: bool, recompute_scale_factor) -> QTensor:
    """Integer bilinear resize, output on x's scale. Each output row (column) reads two input rows with fixed-point
    weights of k = profile.grid_sample.max_coord_shift fractional bits (the J5 bilinear sampler's: 8, so the
    four-tap sum of int16 values fits int32): the source coordinate torch computes (align_corners, or half-pixel
    centers clamped at 0; 1/scale_factor when given) is rounded half up to a multiple of 2^-k, its integer part is
    the first tap, its fraction f the second tap's weight (2^k - f the first's); the sum of the four products is
    shifted right by 2k, rounding half up (kernels.resize_bilinear). QAT computes the same integers on the grid
    values (gradients through the fixed weights), so both modes give the same grid."""
    x = x._plain_op()
    h, w = x.shape[-2:]
    if size is not None:
        out, scales = _two(size), (None, None)
    else:
        scales = _two(scale_factor)
        out = tuple(int(math.floor(n * float(sf))) for n, sf in zip((h, w), scales))
        scales = (None, None) if recompute_scale_factor else scales
    bits = x.profile.grid_sample.max_coord_shift
    (row_index, row_fraction), (col_index, col_fraction) = (
        _bilinear_taps(n, m, sf, align_corners, bits) for n, m, sf in zip((h, w), out, scales))
    params = {"row_index": row_index, "row_fraction": row_fraction, "col_index": col_index,
              "col_fraction": col_fraction, "fraction_bits": bits}
    if x.is_quantized:
        return apply("resize_bilinear", [x], params, x.scale, x.dtype, x.producer)
    one = 1 << bits
    q = ste_round(x.data.double() / x.step)
    r0, r1, fr, gr = (t.double() if i > 1 else t for i, t in
                      enumerate(kernels._taps(row_index, row_fraction, h, one, x.data)))
    c0, c1, fc, gc = (t.double() if i > 1 else t for i, t in
                      enumerate(kernels._taps(col_index, col_fraction, w, one, x.data)))
    rows = q.index_select(-2, r0) * gr.view(-1, 1) + q.index_select(-2, r1) * fr.view(-1, 1)
    acc = rows.index_select(-1, c0) * gc + rows.index_select(-1, c1) * fc  # exact integers in float64
    return x.with_data((ste_round(acc / float(one * one)) * x.step).to(x.data.dtype))


def _bilinear_taps(size: int, out: int, scale_factor, align_corners: bool, bits: int):
    """(first tap, fraction in 2^-bits) per output index: torch's source coordinate rounded half up to the grid."""
    if align_corners:
        ratio = (size - 1) / (out - 1) if out > 1 else 0.0
    else:
        ratio = 1.0 / float(scale_factor) if scale_factor is not None and float(scale_factor) > 0 else size / out
    dst = torch.arange(out, dtype=torch.float64)
    source = ratio * dst if align_corners else (ratio * (dst + 0.5) - 0.5).clamp(min=0)
    fixed = round_half_up(source * (1 << bits)).long()
    index, fraction = fixed >> bits, fixed & ((1 << bits) - 1)
    last = index >= size - 1
    index, fraction = torch.where(last, size - 1, index), torch.where(last, 0, fraction)
    return index.to(torch.int32), fraction.to(torch.int32)


def _two(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list, torch.Size)) else (value, value)


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
def _adaptive_average(x: QTensor, output_size) -> QTensor:
    """Output size 1: global_avg_pool; windows of one size (H, W multiples of the output): avg_pool2d; any other
    size: window_mean, windows [floor(i * H / oh), ceil((i + 1) * H / oh)) with a divisor per output position."""
    h, w = x.shape[-2:]
    oh, ow = (n if o is None else int(o) for n, o in zip((h, w), _two(output_size)))
    if (oh, ow) == (1, 1):
        sums = lambda d: d.sum(dim=(-2, -1), keepdim=True)  # noqa: E731
        return requantized_mean(x, sums, h * w, "global_avg_pool", {})
    if h % oh == 0 and w % ow == 0:
        return _average(x, (h // oh, w // ow))
    rows = [(i * h // oh, -(-(i + 1) * h // oh)) for i in range(oh)]
    cols = [(j * w // ow, -(-(j + 1) * w // ow)) for j in range(ow)]
    sizes = lambda windows: torch.tensor([e - s for s, e in windows], dtype=torch.float64)  # noqa: E731
    return window_mean(x, rows, cols, sizes(rows)[:, None] * sizes(cols)[None, :])


@_register(F.avg_pool2d)
def _average(x: QTensor, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
             divisor_override=None) -> QTensor:
    """Windows of one size: avg_pool2d (one multiplier); ceil_mode windows past the edge or count_include_pad=False
    at a padded border: window_mean, each output position divided by torch's divisor for it."""
    k, s, p = _two(kernel_size), _two(stride or kernel_size), _two(padding)
    axes = [_pool_axis(n, *args, ceil_mode) for n, args in zip(x.shape[-2:], zip(k, s, p))]
    uniform = all(len(full) == len(_pool_axis(n, ki, si, pi, False)[0])
                  for (full, _, _), n, ki, si, pi in zip(axes, x.shape[-2:], k, s, p))
    if uniform and (count_include_pad or not any(p)):
        area = divisor_override or k[0] * k[1]
        sums = lambda d: F.avg_pool2d(d, k, s, p, False, True, divisor_override=1)  # noqa: E731
        window = {"kernel_size": list(k), "stride": list(s), "padding": list(p) if p[0] != p[1] else p[0]}
        return requantized_mean(x, sums, area, "avg_pool2d", window)
    (full_h, rows, clip_h), (full_w, cols, clip_w) = axes
    sizes = (full_h, full_w) if count_include_pad else (clip_h, clip_w)
    divisors = torch.tensor(sizes[0], dtype=torch.float64)[:, None] * torch.tensor(sizes[1], dtype=torch.float64)
    if divisor_override:
        divisors = torch.full_like(divisors, float(divisor_override))
    return window_mean(x, rows, cols, divisors)


def _pool_axis(size: int, k: int, s: int, p: int, ceil_mode: bool):
    """torch's avg_pool windows along one axis: (sizes counting padding, clipped [start, end), clipped sizes)."""
    out = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    full, windows = [], []
    for i in range(out):
        start = i * s - p
        end = min(start + k, size + p)
        full.append(end - start)
        windows.append((max(start, 0), min(end, size)))
    return full, windows, [e - b for b, e in windows]


def window_mean(x: QTensor, rows: list, cols: list, divisors: torch.Tensor) -> QTensor:
    """Sums over windows rows[i] x cols[j] times 1/divisors[i, j] as a multiplier and shift per output position
    (kernels.window_mean); QAT applies the same integer sums and ratios m / 2^n in float64 (exact), so both modes
    give the same grid."""
    x = x._plain_op()
    multiplier, shift = multiplier_and_shift(1.0 / divisors.clamp(min=1), x.profile)
    rows, cols = torch.tensor(rows, dtype=torch.int32), torch.tensor(cols, dtype=torch.int32)
    if x.is_quantized:
        params = {"rows": rows, "cols": cols, "multiplier": multiplier.to(torch.int32),
                  "shift": shift.to(torch.int32), "out_dtype": x.dtype}
        return apply("window_mean", [x], params, x.scale, x.dtype, x.producer)
    r, c = (kernels._window_matrix(b, n, x.data) for b, n in ((rows, x.shape[-2]), (cols, x.shape[-1])))
    sums = r @ ste_round(x.data.double() / x.step) @ c.T
    effective = (multiplier.double() / 2.0 ** shift.double()).to(x.device)
    qmin, qmax = qrange(x.dtype)
    return x.with_data((ste_round(sums * effective).clamp(qmin, qmax) * x.step).to(x.data.dtype))


def requantized_mean(x: QTensor, window_sum: Callable, area: int, op: str, window: dict) -> QTensor:
    """Window sums (int32 on the device) times 1/area via the J5 multiplier and shift, on the input's scale.

    QAT applies the same effective ratio m / 2^n and rounding, so both modes agree."""
    x = x._plain_op()
    multiplier, shift = multiplier_and_shift(torch.tensor(1.0 / area, dtype=torch.float64), x.profile)
    if x.is_quantized:
        params = dict(window, multiplier=int(multiplier), shift=int(shift), out_dtype=x.dtype)
        return apply(op, [x], params, x.scale, x.dtype, x.producer)
    effective = float(multiplier) / 2.0 ** int(shift)
    steps = ste_round(window_sum(x.data.double()) / x.step) * effective  # integer sums first, as on the device
    return x.with_data((ste_round(steps) * x.step).to(x.data.dtype))  # float64: sum * m / 2^n rounds exactly


def ste_round(v: torch.Tensor) -> torch.Tensor:
    """Round half up forward, identity backward."""
    return v + (round_half_up(v) - v).detach()
