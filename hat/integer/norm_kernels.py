"""The normalization kernel: LayerNorm and GroupNorm in integers (issue 16), part of the op set `kernels.KERNELS`.
Its parameters (the rsqrt table, the folded affine) are built at convert time by hat/integer/norm_tables.py.
"""
from __future__ import annotations

import torch

from hat.integer.profile import TORCH_DTYPES, qrange
from hat.integer.table_kernels import leading_bit
from hat.ops.reference import shift_right_round

INT64_BITS = 63  # a sum the kernel holds in int64 stays below 2^63


def _shift_round(v: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """v / 2^shift rounded half up for shift >= 0, v * 2^-shift for shift < 0 (exact)."""
    left = torch.bitwise_left_shift(v, (-shift).clamp(min=0))
    return torch.where(shift > 0, shift_right_round(v, shift.clamp(min=0)), left)


def layer_norm(x: torch.Tensor, *, start_dim: int, groups: int, mean_bits: int, eps: int,
               rsqrt_table: torch.Tensor, fraction_bits: int, rsqrt_bits: int, y_bits: int,
               multiplier: torch.Tensor, shift: torch.Tensor, bias: torch.Tensor, out_dtype: str) -> torch.Tensor:
    """LayerNorm / GroupNorm: integer mean and variance per group, rsqrt mantissa table, per-element affine.

    Normalizes int8/int16 x over dims [start_dim, ...) split into `groups` groups along start_dim, then a per-element
    affine on the output grid: nn.LayerNorm (start_dim = ndim - len(normalized_shape), groups 1) and nn.GroupNorm
    (start_dim 1, groups G). Integer only; F = mean_bits, T = rsqrt_bits, Y = y_bits.

    Per group of n elements: S = sum x (int64); mu = round_half_up(S * 2^F / n) (the mean with F fraction bits);
    D = x * 2^F - mu; Q = sum D^2 (int64, exact: n * 2^(2 (b + F)) < 2^63, b = 8 or 16 the input's span bits);
    E = round_half_up(Q / n) + eps (variance + epsilon in units of 2^-2F input steps squared, at least 1);
    E = 2^e * m with e even and m in [1, 4); r = rsqrt_table interpolated at m (3 * 2^b + 1 entries
    round_half_up(2^T / sqrt(m)) over m = 1 + i / 2^b, `fraction_bits` bits between entries), so 1 / sqrt(E) ~
    r / 2^(T + e/2); y = (D * r) / 2^(T + e/2 - Y) rounded half up (the normalized value with Y fraction bits);
    out = (y * multiplier + bias) / 2^shift rounded half up, saturated to out_dtype. multiplier (int16), shift and
    bias (int32) broadcast against x's dims from start_dim on (one per element of normalized_shape for LayerNorm,
    [C, 1, ...] for GroupNorm, or one value): gamma / s_out / 2^Y and beta / s_out on the output grid."""
    shape, ndim = x.shape, x.dim()
    if not 0 < start_dim < ndim:
        raise ValueError(f"layer_norm: start_dim {start_dim} of a {ndim}-dim input; use [1, {ndim - 1}]")
    if shape[start_dim] % groups:
        raise ValueError(f"layer_norm: {shape[start_dim]} channels in {groups} groups")
    v = x.long().reshape(*shape[:start_dim], groups, -1)
    n = v.shape[-1]
    span = 9 if x.dtype == torch.int8 else 17  # |x - mean| < 2^(span - 1): int8 2^8, int16 2^16
    if n < 1 or (n - 1).bit_length() + 2 * (span - 1 + mean_bits) >= INT64_BITS:
        raise ValueError(f"layer_norm: {n} elements per group with mean_bits {mean_bits} can overflow int64")
    total = v.sum(-1, keepdim=True)
    mean = torch.div(torch.bitwise_left_shift(total, mean_bits + 1) + n, 2 * n, rounding_mode="floor")
    d = torch.bitwise_left_shift(v, mean_bits) - mean
    variance = torch.div(2 * (d * d).sum(-1, keepdim=True) + n, 2 * n, rounding_mode="floor")
    energy = (variance + eps).clamp(min=1)
    e = leading_bit(energy)
    e = e - torch.bitwise_and(e, 1)  # even: the mantissa lies in [1, 4)
    r = _rsqrt_lookup(energy, e, rsqrt_table, fraction_bits)
    y = _shift_round(d * r, rsqrt_bits + torch.bitwise_right_shift(e, 1) - y_bits).reshape(shape)
    trailing = shape[start_dim:]
    m, s, b = (t.long() for t in (multiplier, shift, bias))
    if m.numel() > 1 and m.dim() > len(trailing):
        raise ValueError(f"layer_norm: affine of shape {list(m.shape)} for normalized dims {list(trailing)}")
    out = shift_right_round(y * m + b, s)
    return out.clamp(*qrange(out_dtype)).to(TORCH_DTYPES[out_dtype])


def _rsqrt_lookup(energy: torch.Tensor, e: torch.Tensor, table: torch.Tensor, fraction_bits: int) -> torch.Tensor:
    """The table (3 * 2^b + 1 entries over mantissas [1, 4]) at energy / 2^e, interpolated over `fraction_bits`."""
    entries = table.shape[0] - 1
    step = entries // 3
    if entries < 3 or entries % 3 or step & (step - 1):
        raise ValueError(f"layer_norm: rsqrt_table has {entries + 1} entries; it takes 3 * 2^b + 1")
    bits = step.bit_length() - 1
    width = bits + fraction_bits
    w = torch.as_tensor(width, dtype=torch.int64, device=energy.device)
    right = shift_right_round(energy, (e - w).clamp(min=0))
    a = torch.where(e > w, right, torch.bitwise_left_shift(energy, (w - e).clamp(min=0)))
    whole = torch.bitwise_right_shift(a, fraction_bits)
    j = (whole - (1 << bits)).clamp(0, entries)
    fraction = a - torch.bitwise_left_shift(whole, fraction_bits)
    low, high = torch.take(table.long(), j), torch.take(table.long(), (j + 1).clamp(max=entries))
    return low + torch.bitwise_right_shift((high - low) * fraction + ((1 << fraction_bits) >> 1), fraction_bits)
