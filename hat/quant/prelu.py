"""PReLU (nn.PReLU; prepare_qat_fx also takes F.prelu / torch.prelu with a weight the model holds) in its stages.

float:     nn.PReLU, one slope (num_parameters=1) or one per channel (dim 1 of the input).
QAT:       `QATPReLU`: F.prelu in float on the dequantized input with the float module's own weight parameter (so
           the slope keeps training), output fake-quantized (observed scale).
quantized: `QuantizedPReLU`: one exact piecewise-linear kernel (`prelu` in hat/integer/kernels.py), not a table:
           x >= 0 is requantized by s_in / s_out, x < 0 by slope[c] * s_in / s_out, each as the march's int16
           multiplier (signed: negative slopes are fine) and round-half-up right shift, then saturated. The
           multipliers are resolved against the input's scale at each call, as the other quantized modules do.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hat.integer.arith import multiplier_and_shift
from hat.integer.profile import Profile
from hat.quant.qat import _Named
from hat.quant.qconfig import QConfig
from hat.quant.qtensor import NamedQuantModule, QTensor, QuantizationError, apply

CHANNEL_AXIS = 1  # nn.PReLU's channel dim


class QATPReLU(_Named):
    """F.prelu on the dequantized input with the float module's weight (trained), its output fake-quantized."""

    def __init__(self, prelu: nn.PReLU, qconfig: QConfig):
        super().__init__()
        if qconfig.activation is None:
            raise QuantizationError("prelu: PReLU needs an int8/int16 output qconfig, not a high-precision one")
        self._use_qconfig(qconfig)
        self.weight = prelu.weight  # the same Parameter: the optimizer built after prepare_qat trains the slope
        self.activation_post_process = qconfig.activation()

    def forward(self, x) -> QTensor:
        return self._output(self.activation_post_process, F.prelu(self._input(x), self.weight))

    def extra_repr(self) -> str:
        return f"num_parameters={self.weight.numel()}"


class QuantizedPReLU(NamedQuantModule):
    """One `prelu` kernel; its multipliers and shifts follow the input's scale and the march's profile."""

    def __init__(self, weight: torch.Tensor, out_scale: torch.Tensor, out_dtype: str, profile: Profile):
        super().__init__()
        self.out_dtype, self.profile = out_dtype, profile
        self.register_buffer("weight", weight.detach().clone().reshape(-1))
        self.register_buffer("out_scale", out_scale.detach().clone().reshape(1))

    def integer_params(self, in_scale: torch.Tensor) -> dict:
        """The kernel's parameters for an input of scale `in_scale`: s_in / s_out on x >= 0, slope * s_in / s_out
        (one per slope) on x < 0."""
        ratio = in_scale.double().reshape(1) / self.out_scale.double()
        pos_multiplier, pos_shift = multiplier_and_shift(ratio, self.profile)
        neg_multiplier, neg_shift = multiplier_and_shift(self.weight.double() * ratio, self.profile)
        return {"pos_multiplier": int(pos_multiplier), "pos_shift": int(pos_shift), "neg_multiplier": neg_multiplier,
                "neg_shift": neg_shift, "channel_axis": CHANNEL_AXIS, "out_dtype": self.out_dtype}

    def forward(self, x) -> QTensor:
        (x,) = self._qinputs(x)
        slopes = self.weight.numel()
        if slopes > 1 and (x.ndim <= CHANNEL_AXIS or x.shape[CHANNEL_AXIS] != slopes):
            raise QuantizationError(f"'{self.hat_name}': PReLU with {slopes} slopes (one per channel, dim "
                                    f"{CHANNEL_AXIS}) gets an input of shape {list(x.shape)}")
        return apply("prelu", [x], self.integer_params(x.scale), self.out_scale, self.out_dtype, self.hat_name)

    def extra_repr(self) -> str:
        return f"num_parameters={self.weight.numel()}, out={self.out_dtype}, scale={float(self.out_scale):.6g}"


def qat_module(module: nn.Module, qconfig: QConfig) -> QATPReLU:
    return QATPReLU(module, qconfig)


def quantized_module(module: nn.Module) -> Optional[QuantizedPReLU]:
    if not isinstance(module, QATPReLU):
        return None
    fake_quant = module.activation_post_process
    return QuantizedPReLU(module.weight, fake_quant.current_scale(), fake_quant.dtype, module.profile)
