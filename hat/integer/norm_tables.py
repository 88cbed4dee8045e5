"""The parameters of `kernels.layer_norm` (LayerNorm / GroupNorm), computed once at convert time in float64 for the
input and output scales with the march's profile; the program stores them, the kernel uses nothing else.

- mean_bits F: fraction bits of the group mean, as many as keep the kernel's sum of squares exact in int64
  (n * 2^(2 (b + F)) < 2^63, b = 8 for an int8 input, 16 for int16), at most MAX_MEAN_BITS.
- eps: the module's epsilon in units of 2^-2F input steps squared, eps / s_in^2 * 2^2F rounded half up.
- rsqrt_table: 3 * 2^RSQRT_TABLE_BITS + 1 entries round_half_up(2^T / sqrt(m)), m = 1 + i / 2^b over [1, 4]
  (T = RSQRT_BITS: entries in (2^(T-1), 2^T]), interpolated over RSQRT_FRACTION_BITS bits; an even exponent and a
  mantissa in [1, 4) take the odd powers of two without a sqrt(2) factor.
- y_bits Y: fraction bits of the normalized value (|y| <= sqrt(n)).
- multiplier, shift (per element of the affine): gamma / s_out / 2^Y as the profile's int16 multiplier and shift;
  bias: beta / s_out * 2^shift rounded half up, int32 (the shift lowered where the bias would leave int32).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from hat.integer.arith import multiplier_and_shift
from hat.integer.profile import Profile

RSQRT_TABLE_BITS = 8  # 3 * 2^8 + 1 entries over mantissas [1, 4]
RSQRT_FRACTION_BITS = 8  # interpolation bits between entries
RSQRT_BITS = 15  # entries round_half_up(2^15 / sqrt(m)) in (2^14, 2^15]
Y_BITS = 16  # fraction bits of the normalized value
MAX_MEAN_BITS = 12
INT64_BITS = 63


def span_bits(in_dtype: str, profile: Profile) -> int:
    """b with |x - mean| < 2^b for inputs of `in_dtype` (8 for int8, 16 for int16)."""
    qmin, qmax = profile.qrange(in_dtype)
    return (qmax - qmin).bit_length()


def rsqrt_table() -> torch.Tensor:
    step = 2 ** RSQRT_TABLE_BITS
    m = 1 + torch.arange(3 * step + 1, dtype=torch.float64) / step
    return torch.floor(2.0 ** RSQRT_BITS / torch.sqrt(m) + 0.5).to(torch.int32)


def layer_norm_params(in_scale: float, in_dtype: str, out_scale: float, out_dtype: str, *, count: int,
                      start_dim: int, groups: int, eps: float, weight: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], affine_shape: list[int], profile: Profile) -> dict[str, Any]:
    """The keyword arguments of kernels.layer_norm for groups of `count` elements; weight and bias (float, or None:
    1 and 0) reshaped to `affine_shape`. ValueError when a group is too large for exact int64 sums."""
    s_in, s_out = float(in_scale), float(out_scale)
    mean_bits = min(MAX_MEAN_BITS, (INT64_BITS - 1 - (count - 1).bit_length()) // 2 - span_bits(in_dtype, profile))
    if mean_bits < 0:
        raise ValueError(f"{count} elements per normalized group are too many for exact int64 sums")
    eps_steps = min(math.floor(float(eps) / s_in ** 2 * 2.0 ** (2 * mean_bits) + 0.5), 2 ** 61)
    shape = affine_shape if weight is not None or bias is not None else [1]
    gamma = torch.ones(shape, dtype=torch.float64) if weight is None else weight.detach().double().reshape(shape)
    beta = torch.zeros(shape, dtype=torch.float64) if bias is None else bias.detach().double().reshape(shape)
    ratio = gamma / s_out / 2.0 ** Y_BITS
    _, shift = multiplier_and_shift(ratio, profile)
    offset = (beta / s_out).abs()
    room = torch.floor(torch.log2((2.0 ** 31 - 1) / offset.clamp(min=1e-300))).clamp(min=0, max=profile.max_shift)
    shift = torch.minimum(shift, room.long())
    limit = profile.multiplier_max
    multiplier = torch.floor(ratio * 2.0 ** shift.double() + 0.5).clamp(-limit, limit)
    bias_int = torch.floor(beta / s_out * 2.0 ** shift.double() + 0.5).clamp(-2 ** 31, 2 ** 31 - 1)
    return {"start_dim": int(start_dim), "groups": int(groups), "mean_bits": int(mean_bits), "eps": int(eps_steps),
            "rsqrt_table": rsqrt_table(), "fraction_bits": RSQRT_FRACTION_BITS, "rsqrt_bits": RSQRT_BITS,
            "y_bits": Y_BITS, "multiplier": multiplier.to(torch.int16), "shift": shift.to(torch.int16),
            "bias": bias_int.to(torch.int32), "out_dtype": out_dtype}
