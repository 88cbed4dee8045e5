"""Quantized functional ops with the reference toolchain's semantics: grid_sample (absolute-offset grid) and
norm_grid, the conversion to torch's normalized grid (FAQ 2.3 Q8).

grid_sample takes float tensors (float model), QAT-mode QTensors and quantized-mode QTensors; the integer path is
the hat::grid_sample kernel, and the float/QAT paths compute what it computes up to rounding.
"""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F

from hat.quant.qtensor import QTensor, QuantizationError, apply
from hat.quant.qtensor_ops import ste_round

Tensorish = Union[torch.Tensor, QTensor]


def coord_shift(input_hw: tuple[int, int], grid_hw: tuple[int, int]) -> int:
    """Fractional bits of the int16 grid on J5: clamp(15 - ceil(log2(max(H, W, gH, gW) + 1)), 0, 8)."""
    return int(min(max(15 - math.ceil(math.log2(max(*input_hw, *grid_hw) + 1)), 0), 8))


def norm_grid(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Absolute offsets [N, gH, gW, 2] (x, y in pixels, added to each output pixel's coordinate) -> torch's
    normalized grid for F.grid_sample(..., align_corners=True), exactly as FAQ 2.3 Q8 writes it."""
    n, h, w = grid.shape[:3]
    base_y = torch.arange(h, dtype=grid.dtype, device=grid.device).view(1, h, 1).expand(n, h, w)
    base_x = torch.arange(w, dtype=grid.dtype, device=grid.device).view(1, 1, w).expand(n, h, w)
    in_h, in_w = x.shape[-2:]
    if in_h < 2 or in_w < 2:
        raise QuantizationError(f"norm_grid needs an input of at least 2x2 pixels, got {in_h}x{in_w}")
    norm_x = (grid[..., 0] + base_x) * 2 / (in_w - 1) - 1
    norm_y = (grid[..., 1] + base_y) * 2 / (in_h - 1) - 1
    return torch.stack((norm_x, norm_y), dim=-1)


def grid_sample(input: Tensorish, grid: Tensorish, mode: str = "bilinear", padding_mode: str = "zeros") -> Tensorish:
    """Sample `input` [N, C, H, W] at each output pixel's coordinate plus `grid` [N, gH, gW, 2] (absolute x, y
    offsets in pixels), bilinear or nearest, zeros or border padding. On a QTensor the output keeps the input's
    scale and dtype (qint8); the grid is rounded to J5's fixed point (coord_shift fractional bits, int16)."""
    if mode not in ("bilinear", "nearest") or padding_mode not in ("zeros", "border"):
        raise QuantizationError(f"grid_sample supports mode 'bilinear'|'nearest' and padding_mode 'zeros'|'border' "
                                f"(the J5 kernel's), got mode='{mode}', padding_mode='{padding_mode}'")
    offsets = grid.dequantize() if isinstance(grid, QTensor) else grid
    if not isinstance(input, QTensor):
        return F.grid_sample(input, norm_grid(input, offsets), mode, padding_mode, align_corners=True)
    x = input._plain_op()
    if x.dtype != "qint8":
        raise QuantizationError(f"grid_sample on J5 takes a qint8 input; '{x.producer or 'its producer'}' gives "
                                f"{x.dtype}. Give that module an int8 activation qconfig")
    shift = coord_shift(tuple(x.shape[-2:]), tuple(offsets.shape[1:3]))
    if x.is_quantized:  # the grid: a QTensor of the program, or a float tensor the model holds (a constant)
        grid_scale = grid.scale if isinstance(grid, QTensor) else torch.ones(1)
        params = {"grid_scale": grid_scale, "coord_shift": shift, "mode": mode, "padding_mode": padding_mode}
        return apply("grid_sample", [x, grid], params, x.scale, x.dtype, x.producer)
    fixed = ste_round(offsets * 2 ** shift).clamp(-32768, 32767) / 2 ** shift  # the grid the device will see
    sampled = F.grid_sample(x.data, norm_grid(x.data, fixed), mode, padding_mode, align_corners=True)
    return x.with_data(ste_round(sampled / x.step) * x.step)
