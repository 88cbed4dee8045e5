"""J5 integer primitives on int64 tensors: rounding, saturation, multiplier + shift requantization.

Values are held in int64 so that an int32 accumulator times an int16 multiplier never overflows the host
type; saturation to the target dtype is explicit. Rounding follows the profile (half up).
"""
from __future__ import annotations

import torch

from hat.integer.profile import Profile, qrange
from hat.ops import reference
from hat.ops.reference import shift_right_round  # noqa: F401  (the J5 shift, re-exported with its siblings)


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    return reference.round_grid(x, half_up=True)


def round_to_grid(x: torch.Tensor, rounding: str) -> torch.Tensor:
    """Round real values to integers: "half_up" (J5 hardware) or "half_even" (torch, ONNX)."""
    return reference.round_grid(x, reference.is_half_up(rounding))


def saturate(x: torch.Tensor, dtype: str) -> torch.Tensor:
    qmin, qmax = qrange(dtype)
    return x.clamp(qmin, qmax)


def multiplier_and_shift(ratio: torch.Tensor, profile: Profile) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer m (|m| <= profile.multiplier_max) and shift n with m / 2^n ~= ratio, n as large as fits.

    n = clamp(floor(log2(multiplier_max / |ratio|)), 0, max_shift); m = round_half_up(ratio * 2^n).
    """
    ratio = torch.as_tensor(ratio, dtype=torch.float64)
    magnitude = ratio.abs().clamp(min=1e-30)
    shift = torch.floor(torch.log2(profile.multiplier_max / magnitude)).clamp(0, profile.max_shift)
    multiplier = round_half_up(ratio * torch.pow(2.0, shift))
    too_big = multiplier.abs() > profile.multiplier_max  # log2 rounding at the edge
    shift = torch.where(too_big, (shift - 1).clamp(min=0), shift)
    multiplier = round_half_up(ratio * torch.pow(2.0, shift)).clamp(-profile.multiplier_max, profile.multiplier_max)
    return multiplier.to(torch.int64), shift.to(torch.int64)

