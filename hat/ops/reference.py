"""Pure-PyTorch reference of every hat:: op, same signatures as torch.ops.hat.*.

The kernels in hat/csrc must equal these: bit-exact for the integer ops, exact for fake quant (same float
operations in the same order), to float tolerance for reductions (the LSQ scale gradient). They run whenever
the compiled library is missing or a dtype/device has no kernel.
"""
from __future__ import annotations

from typing import Optional

import torch


def _per_channel(values: torch.Tensor, like: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    if axis is None:
        return values.reshape(())
    shape = [1] * like.ndim
    shape[axis] = -1
    return values.reshape(shape)


def is_half_up(rounding: str) -> bool:
    """The rounding names: "half_up" (J5 hardware) or "half_even" (torch, ONNX); anything else is an error."""
    if rounding not in ("half_up", "half_even"):
        raise ValueError(f"rounding must be 'half_up' or 'half_even', got '{rounding}'")
    return rounding == "half_up"


def round_grid(v: torch.Tensor, half_up: bool) -> torch.Tensor:
    return torch.floor(v + 0.5) if half_up else torch.round(v)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, axis: Optional[int], qmin: int, qmax: int,
               half_up: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through fake quant: (clamp(round(x / s)) * s, mask of values whose rounding stayed in range)."""
    s = _per_channel(scale, x, axis)
    rounded = round_grid(x / s, half_up)
    clamped = rounded.clamp(qmin, qmax)
    return clamped * s, clamped == rounded


def fake_quant_backward(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, axis: Optional[int], qmin: int, qmax: int,
                   half_up: bool) -> torch.Tensor:
    s = _per_channel(scale, x, axis)
    return round_grid((x / s).clamp(qmin, qmax), half_up) * s


def lsq_fake_quant_backward(grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, axis: Optional[int],
                            qmin: int, qmax: int, half_up: bool,
                            grad_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LSQ (Esser et al., 2020): d/dx = 1 inside [qmin, qmax]; d/ds = round(v) - v inside, qmin below, qmax above
    (v = x / s), summed per scale, times the gradient scale `grad_factor`."""
    v = x / _per_channel(scale, x, axis)
    below, above = v < qmin, v > qmax
    inside = ~(below | above)
    ds = torch.where(inside, round_grid(v, half_up) - v, torch.where(below, float(qmin), float(qmax))) * grad
    ds = ds.sum().reshape(1) if axis is None else ds.transpose(0, axis).reshape(ds.shape[axis], -1).sum(1)
    return grad * inside, (ds * grad_factor).reshape(scale.shape).to(scale.dtype)


def folded_channel_range(weight: torch.Tensor, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max per output channel (axis 0) of W * f, f per channel, without forming W * f."""
    flat = weight.reshape(len(factor), -1)
    low, high = flat.amin(1) * factor, flat.amax(1) * factor
    return torch.minimum(low, high), torch.maximum(low, high)  # a negative f swaps the ends


def folded_step(scale: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The step that quantizes W as scale quantizes W * f: scale / f (a negative f mirrors the grid). f = 0: a step
    so large that the channel quantizes to 0; divided by 1 first, so no 0 / 0 reaches a learned scale's gradient."""
    zero = factor == 0
    return torch.where(zero, torch.finfo(scale.dtype).max, scale / torch.where(zero, 1.0, factor))


def folded_range(weight: torch.Tensor, factor: torch.Tensor, divisor: float,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output channel of W * f: min, max, symmetric scale max(|min|, |max|) / divisor (at least eps), and the
    folded step that quantizes W itself."""
    lo, hi = folded_channel_range(weight, factor)
    scale = (torch.maximum(lo.abs(), hi.abs()) / divisor).clamp(min=eps)
    return lo, hi, scale, folded_step(scale, factor)


def fake_quant_folded(weight: torch.Tensor, factor: torch.Tensor, divisor: float, eps: float, qmin: int, qmax: int,
                      half_up: bool) -> tuple[torch.Tensor, ...]:
    """fake_quant(W * f) / f with the scale observed from W * f: (out, mask, lo, hi, scale)."""
    lo, hi, scale, step = folded_range(weight, factor, divisor, eps)
    out, mask = fake_quant(weight, step, 0, qmin, qmax, half_up)
    return out, mask, lo, hi, scale


def shift_right_round(v: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """Arithmetic right shift with round half up: (v + 2^(n-1)) >> n; n = 0 leaves v unchanged."""
    shift = torch.as_tensor(shift, dtype=torch.int64, device=v.device)
    half = torch.where(shift > 0, torch.bitwise_left_shift(torch.ones_like(shift), (shift - 1).clamp(min=0)), 0)
    return torch.bitwise_right_shift(v + half, shift)


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor, axis: Optional[int], qmin: int,
               qmax: int, dtype: torch.dtype) -> torch.Tensor:
    """J5: (acc * m + 2^(n-1)) >> n, saturated to [qmin, qmax]; m, n per tensor or per channel along `axis`."""
    if shift.numel() and not (0 <= int(shift.min()) and int(shift.max()) <= 62):
        raise ValueError("hat::requantize: shifts must lie in [0, 62]")
    multiplier = _per_channel(multiplier.to(acc.device, torch.int64), acc, axis)
    shift = _per_channel(shift.to(acc.device, torch.int64), acc, axis)
    return shift_right_round(acc.to(torch.int64) * multiplier, shift).clamp(qmin, qmax).to(dtype)


def grid_sample(input: torch.Tensor, grid: torch.Tensor, coord_shift: int, mode: str,
                padding_mode: str) -> torch.Tensor:
    """Integer grid sample: int8 input [N, C, H, W], int16 grid [N, Ho, Wo, 2] of absolute (x, y) offsets with
    `coord_shift` fractional bits, added to each output pixel's own coordinate. Bilinear weights are fixed point
    with the same bits; the sum is shifted back with round half up. Out-of-range taps read 0 (zeros) or the
    clamped coordinate (border). Output int8 on the input's scale."""
    n, c, h, w = input.shape
    out_h, out_w = grid.shape[1:3]
    one = 1 << coord_shift
    base_x = torch.arange(out_w, device=grid.device, dtype=torch.int32).mul(one).view(1, 1, -1)
    base_y = torch.arange(out_h, device=grid.device, dtype=torch.int32).mul(one).view(1, -1, 1)
    fx, fy = grid[..., 0].to(torch.int32) + base_x, grid[..., 1].to(torch.int32) + base_y
    flat = input.reshape(n, c, h * w).to(torch.int32)

    def tap(ix: torch.Tensor, iy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        index = torch.where(valid, iy * w + ix, 0).reshape(n, 1, -1).expand(n, c, -1).long()
        return flat.gather(2, index).reshape(n, c, out_h, out_w), valid.unsqueeze(1)

    if mode == "nearest":
        ix, iy = shift_right_round(fx, coord_shift), shift_right_round(fy, coord_shift)
        if padding_mode == "border":
            ix, iy = ix.clamp(0, w - 1), iy.clamp(0, h - 1)
        values, valid = tap(ix, iy)
        return torch.where(valid, values, 0).to(torch.int8)
    if padding_mode == "border":
        fx, fy = fx.clamp(0, (w - 1) * one), fy.clamp(0, (h - 1) * one)
    x0, y0 = fx >> coord_shift, fy >> coord_shift
    dx, dy = fx - x0 * one, fy - y0 * one
    acc = torch.zeros(n, c, out_h, out_w, dtype=torch.int32, device=input.device)
    for ix, iy, weight in ((x0, y0, (one - dx) * (one - dy)), (x0 + 1, y0, dx * (one - dy)),
                           (x0, y0 + 1, (one - dx) * dy), (x0 + 1, y0 + 1, dx * dy)):
        values, valid = tap(ix, iy)
        acc += torch.where(valid, values * weight.unsqueeze(1), 0)
    return shift_right_round(acc, 2 * coord_shift).to(torch.int8)
