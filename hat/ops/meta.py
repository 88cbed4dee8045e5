"""Shape-only ("fake") versions of the hat:: ops, so that torch.export / torch.compile can trace models that use
the kernels (graph capture for ONNX export runs on fake tensors)."""
from __future__ import annotations

from typing import Optional

import torch


def register() -> None:
    @torch.library.register_fake("hat::fake_quant")
    def _fake_quant(x, scale, axis: Optional[int], qmin: int, qmax: int, half_up: bool):
        return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)

    @torch.library.register_fake("hat::fake_quant_backward")
    def _fake_quant_backward(grad, mask):
        return torch.empty_like(grad)

    @torch.library.register_fake("hat::fake_quant_backward_")
    def _fake_quant_backward_inplace(grad, mask):
        return grad

    @torch.library.register_fake("hat::lsq_fake_quant")
    def _lsq(x, scale, axis: Optional[int], qmin: int, qmax: int, half_up: bool):
        return torch.empty_like(x)

    @torch.library.register_fake("hat::lsq_fake_quant_backward")
    def _lsq_backward(grad, x, scale, axis: Optional[int], qmin: int, qmax: int, half_up: bool, grad_factor: float):
        return torch.empty_like(x), torch.empty_like(scale)

    for name in ("fake_quant_autograd", "lsq_fake_quant_autograd"):
        torch.library.register_fake(f"hat::{name}")(lambda x, *args: torch.empty_like(x))

    def _folded(weight, factor, divisor: float, eps: float, qmin: int, qmax: int, half_up: bool):
        per_channel = factor.new_empty((factor.numel(),))
        return torch.empty_like(weight), per_channel, torch.empty_like(per_channel), torch.empty_like(per_channel)

    torch.library.register_fake("hat::fake_quant_folded_autograd")(_folded)

    @torch.library.register_fake("hat::fake_quant_folded")
    def _folded_with_mask(weight, factor, divisor: float, eps: float, qmin: int, qmax: int, half_up: bool):
        out, lo, hi, scale = _folded(weight, factor, divisor, eps, qmin, qmax, half_up)
        return out, torch.empty_like(weight, dtype=torch.bool), lo, hi, scale

    @torch.library.register_fake("hat::requantize")
    def _requantize(acc, multiplier, shift, axis: Optional[int], qmin: int, qmax: int, dtype: torch.dtype):
        return torch.empty_like(acc, dtype=dtype)

    @torch.library.register_fake("hat::gemm_epilogue")
    def _gemm_epilogue(acc, bias, multiplier, shift, upper, lower: int, qmin: int, dtype: torch.dtype):
        return torch.empty_like(acc, dtype=dtype)

    @torch.library.register_fake("hat::im2col")
    def _im2col(x, kernel, stride, padding, dilation):
        out_h, out_w = ((size + 2 * p - d * (k - 1) - 1) // s + 1
                        for size, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation))
        return x.new_empty((x.shape[0] * out_h * out_w, kernel[0] * kernel[1] * x.shape[1]))

    @torch.library.register_fake("hat::depthwise_conv2d")
    def _depthwise(x, weight, stride, padding, dilation, bias, multiplier, shift, upper, lower: int, qmin: int,
                   dtype: torch.dtype):
        (kh, kw), (h, w) = weight.shape[:2], x.shape[2:]
        out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        return x.new_empty((x.shape[0] * out_h * out_w, x.shape[1]), dtype=dtype)

    @torch.library.register_fake("hat::add_requantize")
    def _add_requantize(x, y, x_shift: int, x_sign: int, y_multiplier: int, multiplier: int, shift: int, qmin: int,
                        qmax: int, dtype: torch.dtype):
        return torch.empty_like(x, dtype=dtype)

    @torch.library.register_fake("hat::grid_sample")
    def _grid_sample(input, grid, coord_shift: int, mode: str, padding_mode: str):
        return input.new_empty((input.shape[0], input.shape[1], grid.shape[1], grid.shape[2]))
