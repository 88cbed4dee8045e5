"""Custom ops: fused fake quant (straight-through and LSQ), J5 requantize, integer grid sample.

Each op runs the compiled kernel of hat._C when it is loaded and has one for the tensor's device and dtype,
else the pure-PyTorch reference (hat.ops.reference) that the kernels are tested against.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from hat.ops import reference
from hat.ops.loader import ExtensionError, ExtensionStatus, ExtensionWarning, load_extension

__all__ = ["fake_quant", "lsq_fake_quant", "fake_quant_folded", "requantize", "grid_sample", "extension_status",
           "ExtensionError", "ExtensionWarning"]

_STATUS = load_extension()
if _STATUS.loaded:
    from hat.ops import meta

    meta.register()
_KERNEL_FLOATS = (torch.float32, torch.float64)
_warned_cuda = False


def extension_status() -> ExtensionStatus:
    return _STATUS


def _uses_kernel(t: torch.Tensor, floats_only: bool = False) -> bool:
    global _warned_cuda
    if not _STATUS.loaded or (floats_only and t.dtype not in _KERNEL_FLOATS):
        return False
    if t.device.type in ("cpu", "meta"):  # meta: the op's shape rule (hat/ops/meta.py), e.g. a .hir load's dry run
        return True
    if t.device.type == "cuda" and not _STATUS.cuda and not _warned_cuda:
        _warned_cuda = True
        warnings.warn("hat._C was built without CUDA kernels (no nvcc at build time); CUDA tensors use the "
                      "pure-PyTorch reference ops. Rebuild with CUDA_HOME set to get them.", ExtensionWarning)
    return t.device.type == "cuda" and _STATUS.cuda


def _impl(name: str, t: torch.Tensor, floats_only: bool = False):
    return getattr(torch.ops.hat, name) if _uses_kernel(t, floats_only) else getattr(reference, name)


class _FakeQuant(torch.autograd.Function):
    """The reference path's autograd; with the compiled library, hat::fake_quant_autograd does this in C++."""

    @staticmethod
    def forward(ctx, x, scale, axis, qmin, qmax, half_up):
        out, mask = reference.fake_quant(x, scale, axis, qmin, qmax, half_up)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return reference.fake_quant_backward(grad, mask), None, None, None, None, None


class _LsqFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, axis, qmin, qmax, half_up, grad_factor):
        ctx.save_for_backward(x, scale)
        ctx.args = (axis, qmin, qmax, half_up, grad_factor)
        return reference.lsq_fake_quant(x, scale, axis, qmin, qmax, half_up)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        dx, dscale = reference.lsq_fake_quant_backward(grad, x, scale, *ctx.args)
        return dx, dscale, None, None, None, None, None


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 1 else t.reshape(-1)  # no view node in the autograd graph when it is already flat


def _axis(scale: torch.Tensor, axis: Optional[int]) -> Optional[int]:
    return axis if scale.numel() > 1 else None  # one scale (e.g. per-channel before observing): per tensor


def fake_quant(x: torch.Tensor, scale: torch.Tensor, axis: Optional[int], qmin: int, qmax: int,
               rounding: str = "half_up") -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient (1 where the rounded value is in range, else 0).
    `scale`: [1] per tensor or [C] along `axis`. No gradient flows to `scale` (it comes from an observer)."""
    scale = _flat(scale.detach().to(x.dtype))
    function = torch.ops.hat.fake_quant_autograd if _uses_kernel(x, floats_only=True) else _FakeQuant.apply
    return function(x, scale, _axis(scale, axis), qmin, qmax, reference.is_half_up(rounding))


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, axis: Optional[int], qmin: int, qmax: int,
                   rounding: str = "half_up", grad_factor: float = 1.0) -> torch.Tensor:
    """LSQ fake quant: gradients to x (straight-through inside the range) and to the learned `scale`."""
    scale = _flat(scale.to(x.dtype))
    function = torch.ops.hat.lsq_fake_quant_autograd if _uses_kernel(x, floats_only=True) else _LsqFakeQuant.apply
    return function(x, scale, _axis(scale, axis), qmin, qmax, reference.is_half_up(rounding), grad_factor)


def fake_quant_folded(weight: torch.Tensor, factor: torch.Tensor, divisor: float, eps: float, qmin: int, qmax: int,
                      rounding: str = "half_up") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Observe and fake-quantize a weight with its per-output-channel BN factor f folded in: (fake_quant(W * f) / f,
    min and max of W * f per channel, scale). W * f is never formed; gradients flow to W only."""
    factor = factor.detach().to(weight.dtype)
    half_up = reference.is_half_up(rounding)
    if weight.device.type == "cpu" and _uses_kernel(weight, floats_only=True):
        return torch.ops.hat.fake_quant_folded_autograd(weight, factor, divisor, eps, qmin, qmax, half_up)
    with torch.no_grad():
        lo, hi, scale, step = reference.folded_range(weight.detach(), factor, divisor, eps)
    return fake_quant(weight, step, 0, qmin, qmax, rounding), lo, hi, scale


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor, axis: Optional[int], qmin: int,
               qmax: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """J5 requantization of an integer accumulator: (acc * m + 2^(n-1)) >> n, saturated to [qmin, qmax]."""
    multiplier, shift = _flat(multiplier), _flat(shift)
    return _impl("requantize", acc)(acc, multiplier, shift, _axis(multiplier, axis), qmin, qmax, dtype)


def grid_sample(input: torch.Tensor, grid: torch.Tensor, coord_shift: int, mode: str = "bilinear",
                padding_mode: str = "zeros") -> torch.Tensor:
    """Integer grid sample (reference-toolchain semantics); see hat.ops.reference.grid_sample."""
    if mode not in ("bilinear", "nearest") or padding_mode not in ("zeros", "border"):
        raise ValueError(f"grid_sample supports mode bilinear|nearest and padding_mode zeros|border, got "
                         f"mode='{mode}', padding_mode='{padding_mode}'")
    if not 0 <= coord_shift <= 8:
        raise ValueError(f"grid_sample: coord_shift must be in [0, 8], got {coord_shift}")
    return _impl("grid_sample", input)(input, grid, coord_shift, mode, padding_mode)
