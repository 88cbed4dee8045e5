"""softmax and log_softmax over a dim, int8 and int16 activations, in the three stages.

float:     `SoftmaxOp(dim, log=False)`, what prepare_qat_fx puts in place of `F.softmax(x, dim)`, `torch.softmax`,
           `x.softmax(dim)` and the log_softmax calls; `nn.Softmax`, `nn.LogSoftmax` and `nn.Softmax2d` are taken
           as they are. A `dtype=` argument is refused (the integer op has its own output dtype), as are a missing
           dim (torch's implicit-dim legacy) and the batch dim 0 (a program runs on any batch size).
QAT:       `QATSoftmax`: F.softmax / F.log_softmax in float on the dequantized input, output fake-quantized with an
           observed scale (softmax lies in [0, 1] and log_softmax is <= 0, so the symmetric grid's other half stays
           unused: the J5 scheme has no zero point).
quantized: `QuantizedSoftmax`: one integer kernel, `kernels.softmax_lut`, whose tables lut.softmax_params builds
           in float64 for the input and output scales with the module's profile (hat/integer/lut.py):
           d = x - max(x) (int32, <= 0); e = exp(d * s_in) on the int16 table grid, exp(0) = 32767: for an int8
           input an exact table of 256 entries (d in [-255, 0]); for an int16 input d saturated to int16 (or first
           halved, rounded, when exp is still above half a grid step at d = -32768) into a segmented table
           (segment_table over d: 6 tables of 64 entries); S = int32 sum of e (<= 32767 * 65536 < 2^31);
           S = 2^n * m, m in [1, 2] rounded to 16 fraction bits; a table of 257 entries over m interpolated over
           8 bits: softmax out = (e * round_half_up(2^K / (m * s_out)) + 2^(n+K-1)) >> (n + K) (entries <= 2^16 - 1,
           so e * entry < 2^31), saturated to [0, qmax]; log_softmax: d * s_in - n * ln2 - ln(m) + ln(32767) in
           units of s_out / 2^F (F: the int16 multiplier's shift for s_in / s_out), rounded to s_out, saturated
           to [qmin, 0]. The program stores the tables, so program and model are bit-exact.
Accuracy against float64 softmax of the same integers (`benchmarks/lut_accuracy.py`, RESULTS.md): int8 outputs
within 0.52 of a step up to 100 classes (0.66 with 1000); int16 log_softmax within ~1.4 steps up to 100 classes;
int16 softmax within 3 steps at 10 classes, 9 at 100 and ~50 at 1000, set by the int16 exp grid: every e below half
a grid step rounds to 0 (d * s_in < -11), so with many classes S is systematically low.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hat.integer import lut
from hat.integer.profile import Profile
from hat.quant.qat import _Named
from hat.quant.qconfig import QConfig
from hat.quant.qtensor import NamedQuantModule, QTensor, QuantizationError, apply

KERNEL = "softmax_lut"


class SoftmaxOp(nn.Module):
    """Float softmax (log_softmax when `log`) over `dim`: a place for QAT to observe its output."""

    def __init__(self, dim: Optional[int], log: bool = False):
        super().__init__()
        self.dim, self.log = dim, bool(log)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(x, self.dim) if self.log else F.softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}" + (", log=True" if self.log else "")


def softmax_of(module: nn.Module) -> Optional[tuple[Optional[int], bool]]:
    """(dim, log) when `module` is a softmax or log_softmax module, else None."""
    if isinstance(module, SoftmaxOp):
        return module.dim, module.log
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
        return module.dim, isinstance(module, nn.LogSoftmax)
    if isinstance(module, nn.Softmax2d):
        return -3, False
    return None


def checked_dim(dim: Optional[int], ndim: int, log: bool, where: str) -> int:
    """`dim` as a non-negative dim of an ndim-dim input; QuantizationError (`where`: the module or the user's line)
    for no dim and for the batch dim."""
    name = "log_softmax" if log else "softmax"
    if dim is None:
        raise QuantizationError(f"{where}: {name} without a dim (torch's implicit-dim legacy); give the "
                                f"dim explicitly, e.g. nn.Softmax(dim=1) or F.softmax(x, dim=1)")
    if not -ndim <= dim < ndim:
        raise QuantizationError(f"{where}: {name} over dim {dim} of a {ndim}-dim input; use a dim in "
                                f"[1, {ndim - 1}]")
    if dim % ndim == 0:
        raise QuantizationError(f"{where}: {name} over dim {dim}, the batch dim: the integer program runs "
                                f"on any batch size, so it normalizes within a sample only; use a dim in "
                                f"[1, {ndim - 1}] (reshape first if the batch holds one sample's scores)")
    return dim % ndim


class QATSoftmax(_Named):
    """F.softmax / F.log_softmax on the dequantized input in float, its output fake-quantized (observed scale)."""

    def __init__(self, dim: Optional[int], log: bool, qconfig: QConfig):
        super().__init__()
        if qconfig.activation is None:
            raise QuantizationError(f"{'log_softmax' if log else 'softmax'}: a table op needs an int8/int16 output "
                                    f"qconfig, not a high-precision one")
        self._use_qconfig(qconfig)
        self.dim, self.log = dim, bool(log)
        self.activation_post_process = qconfig.activation()

    def forward(self, x) -> QTensor:
        x = self._input(x)
        dim = checked_dim(self.dim, x.ndim, self.log, f"module '{self.hat_name}'")
        return self._output(self.activation_post_process, F.log_softmax(x, dim) if self.log else F.softmax(x, dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}" + (", log=True" if self.log else "")


class QuantizedSoftmax(NamedQuantModule):
    """One softmax_lut kernel; its tables for an input scale and dtype are built once (float64) and reused."""

    def __init__(self, dim: Optional[int], log: bool, out_scale: torch.Tensor, out_dtype: str, profile: Profile):
        super().__init__()
        self.dim, self.log, self.out_dtype, self.profile = dim, bool(log), out_dtype, profile
        self.register_buffer("out_scale", out_scale.detach().clone().reshape(1))
        self._params: dict[tuple[float, str], dict] = {}

    def forward(self, x) -> QTensor:
        (x,) = self._qinputs(x)
        dim = checked_dim(self.dim, x.ndim, self.log, f"module '{self.hat_name}'")
        return apply(KERNEL, [x], {"dim": dim, **self.kernel_params(float(x.scale), x.dtype)}, self.out_scale,
                     self.out_dtype, self.hat_name)

    def kernel_params(self, in_scale: float, in_dtype: str) -> dict:
        """The kernel's parameters (all but dim) for an input of `in_scale` and `in_dtype`."""
        key = (in_scale, in_dtype)
        if key not in self._params:
            try:
                self._params[key] = lut.softmax_params(in_scale, in_dtype, float(self.out_scale), self.out_dtype,
                                                       log=self.log, profile=self.profile)
            except ValueError as exc:
                raise QuantizationError(f"module '{self.hat_name}': {exc}; check its calibration (an output that "
                                        f"stayed 0, as log_softmax over a dim of size 1, has no scale)") from None
        return self._params[key]

    def extra_repr(self) -> str:
        return (f"{'log_softmax' if self.log else 'softmax'}, dim={self.dim}, out={self.out_dtype}, "
                f"scale={float(self.out_scale):.6g}")


def qat_module(module: nn.Module, qconfig: QConfig) -> QATSoftmax:
    dim, log = softmax_of(module)
    return QATSoftmax(dim, log, qconfig)


def quantized_module(module: QATSoftmax) -> QuantizedSoftmax:
    fake_quant = module.activation_post_process
    return QuantizedSoftmax(module.dim, module.log, fake_quant.current_scale(), fake_quant.dtype, module.profile)
