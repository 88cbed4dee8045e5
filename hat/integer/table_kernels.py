"""The table kernels: nonlinear element-wise ops (exact and segmented look-up tables) and softmax / log_softmax,
all integer at run time; their tables are built at convert time (hat/integer/lut.py) and stored in the program.
Part of the op set `kernels.KERNELS`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hat import ops
from hat.integer.profile import TORCH_DTYPES, qrange


# --- look-up tables (nonlinear element-wise ops; tables built at convert time by lut.py) ----------------------------
def lookup(x: torch.Tensor, *, table: torch.Tensor, out_dtype: str) -> torch.Tensor:
    """f by an exact table: one entry per integer of x's dtype, out = table[x - min(dtype)] (an int8 input)."""
    return table[x.long() - torch.iinfo(x.dtype).min].to(TORCH_DTYPES[out_dtype])


def segment_lookup(x: torch.Tensor, *, points: torch.Tensor, tables: torch.Tensor, index_multiplier: torch.Tensor,
                   index_shift: torch.Tensor, index_bits: torch.Tensor, line_multiplier: torch.Tensor,
                   line_shift: torch.Tensor, line_offset: torch.Tensor, odd: bool, internal_dtype: str, out_shift: int,
                   out_dtype: str) -> torch.Tensor:
    """f by a segmented table (lut.segment_table; an int16 input), on the `internal_dtype` grid, then
    (v + 2^(out_shift-1)) >> out_shift onto out_dtype (J5: the int16 grid, (v + 128) >> 8 for an int8
    output; odd f: f(|x|), the sign mirrored. 8 segments, each a fixed-point position of x,
    p = ((x - origin) * multiplier + 2^(shift-1)) >> shift: left of points[0] and right of points[-1] a line,
    y = line_offset + p (origin: that point); between points[i] and points[i+1] table i (origin points[i], `bits`
    fractional bits), y = T[j] + ((T[j+1] - T[j]) * (p - j * 2^bits) + 2^(bits-1)) >> bits, j = min(p >> bits, 63).
    A tensor with more elements than x's dtype has values is computed as that table (the same integers), indexed."""
    params = dict(points=points, tables=tables, index_multiplier=index_multiplier, index_shift=index_shift,
                  index_bits=index_bits, line_multiplier=line_multiplier, line_shift=line_shift,
                  line_offset=line_offset, odd=odd, internal_dtype=internal_dtype, out_shift=out_shift,
                  out_dtype=out_dtype)
    low, high = torch.iinfo(x.dtype).min, torch.iinfo(x.dtype).max
    if x.numel() <= high - low + 1:
        return _segment_lookup(x.reshape(-1), **params).reshape(x.shape)
    every = _segment_lookup(torch.arange(low, high + 1, device=x.device).to(x.dtype), **params)
    return every.index_select(0, x.reshape(-1).long() - low).reshape(x.shape)


def _segment_lookup(x: torch.Tensor, *, points: torch.Tensor, tables: torch.Tensor, index_multiplier: torch.Tensor,
                    index_shift: torch.Tensor, index_bits: torch.Tensor, line_multiplier: torch.Tensor,
                    line_shift: torch.Tensor, line_offset: torch.Tensor, odd: bool, internal_dtype: str,
                    out_shift: int, out_dtype: str) -> torch.Tensor:
    """segment_lookup of a 1-d x. The segments share one array of entries: the tables, then one entry per line
    (its offset, step 1, 0 bits: y = offset + p); each segment's position counts from its own first entry."""
    v = x.long().abs() if odd else x.long()
    d, (count, entries) = points.long(), tables.shape
    zero = d[:1] * 0
    lines = torch.arange(count * entries, count * entries + 2, device=d.device)
    starts = torch.arange(count, device=d.device) * entries
    first, last = torch.cat([lines[:1], starts, lines[1:]]), torch.cat([lines[:1], starts + entries - 1, lines[1:]])
    multiplier = torch.cat([line_multiplier[:1], index_multiplier, line_multiplier[1:]]).long()
    shift = torch.cat([line_shift[:1], index_shift, line_shift[1:]]).long()
    bits = torch.cat([zero, index_bits.long(), zero])
    origin = torch.cat([d[:1], d[:-1], d[-1:]])
    constant = torch.bitwise_left_shift(first, bits + shift) + _half(shift) - origin * multiplier
    entry_value = torch.cat([tables.reshape(-1).long(), line_offset.long()])
    steps = F.pad(tables[:, 1:].long() - tables[:, :-1].long(), (0, 1))  # to the next entry; 0 after the last
    entry_step = torch.cat([steps.reshape(-1), zero + 1, zero + 1])
    segment = torch.bucketize(v, torch.cat([d[:-1], d[-1:] + 1]), right=True)  # 0: left line ... 7: right line
    m, c, n, b, half, lo, hi = (t.index_select(0, segment) for t in (multiplier, constant, shift, bits, _half(bits),
                                                                      first, last))
    at = torch.bitwise_right_shift(v * m + c, n)
    entry = torch.minimum(torch.maximum(torch.bitwise_right_shift(at, b), lo), hi)
    fraction = at - torch.bitwise_left_shift(entry, b)
    out = entry_value.index_select(0, entry) + torch.bitwise_right_shift(
        entry_step.index_select(0, entry) * fraction + half, b)
    out = out.clamp_(*qrange(internal_dtype))
    qmin, qmax = qrange(out_dtype)
    if out_shift:
        out = torch.bitwise_right_shift(out + (1 << (out_shift - 1)), out_shift).clamp_(qmin, qmax)
    if odd:  # y(-x) = -y(x) exactly: |y| <= qmax
        out = torch.where(x < 0, -out, out).clamp_(-qmax, qmax)
    return out.to(TORCH_DTYPES[out_dtype])


def _half(shift: torch.Tensor) -> torch.Tensor:
    """2^(n-1), 0 for n = 0: what round half up adds before a right shift by n."""
    return torch.bitwise_right_shift(torch.bitwise_left_shift(torch.ones_like(shift), shift), 1)


# --- softmax / log_softmax over a dim (tables built at convert time by lut.softmax_params) ---------------------------
def softmax_lut(x: torch.Tensor, *, dim: int, log: bool, d_shift: int, internal_dtype: str,
                exp_table: Optional[torch.Tensor] = None, points: Optional[torch.Tensor] = None,
                tables: Optional[torch.Tensor] = None, index_multiplier: Optional[torch.Tensor] = None,
                index_shift: Optional[torch.Tensor] = None, index_bits: Optional[torch.Tensor] = None,
                line_multiplier: Optional[torch.Tensor] = None, line_shift: Optional[torch.Tensor] = None,
                line_offset: Optional[torch.Tensor] = None, mantissa_table: torch.Tensor, fraction_bits: int,
                recip_shift: Optional[int] = None, multiplier: Optional[int] = None, shift: Optional[int] = None,
                ln2: Optional[int] = None, log_offset: Optional[int] = None, out_dtype: str) -> torch.Tensor:
    """softmax (log_softmax when `log`) of int8/int16 x over `dim`: exp table of x - max, int32 sum, mantissa table.

    d = x - max(x, dim) (<= 0); d' = (d + 2^(d_shift-1)) >> d_shift; e = exp(d') on the `internal_dtype` grid
    (exp(0) = its qmax): exp_table[min(-d', len - 1)] (an int8 input) or segment_lookup of d' saturated to int16;
    S = sum of e over dim (int32), n its leading-bit position, a = S * 2^(w - n) rounded half up, w = b +
    fraction_bits (mantissa_table has 2^b + 1 entries, mantissa a / 2^w in [1, 2]); t = the table interpolated at a
    (entry j = (a >> fraction_bits) - 2^b, the fraction bits between j and j + 1, rounded half up).
    softmax: (e * t + 2^(s-1)) >> s, s = n + recip_shift, saturated to [0, qmax].
    log_softmax: (d * multiplier - n * ln2 - t + log_offset + 2^(shift-1)) >> shift, saturated to [qmin, 0]."""
    segments = dict(points=points, tables=tables, index_multiplier=index_multiplier, index_shift=index_shift,
                    index_bits=index_bits, line_multiplier=line_multiplier, line_shift=line_shift,
                    line_offset=line_offset)
    if (exp_table is None) == (points is None) or (None in (multiplier, shift, ln2, log_offset) if log
                                                   else recip_shift is None):
        raise ValueError("softmax_lut takes exp_table or the segmented exp tables (points, ...), and multiplier, "
                         "shift, ln2, log_offset (log_softmax) or recip_shift (softmax)")
    round_shift = ops.reference.shift_right_round
    d = x.long() - x.long().amax(dim=dim, keepdim=True)
    e = _exp_of_difference(round_shift(d, d_shift), exp_table, segments, internal_dtype)
    total = e.sum(dim=dim, keepdim=True).clamp(min=1)
    n = leading_bit(total)
    t = _mantissa_lookup(total, n, mantissa_table, fraction_bits)
    qmin, qmax = qrange(out_dtype)
    if log:
        out = round_shift(d * multiplier - n * ln2 - t + log_offset, shift).clamp(qmin, min(qmax, 0))
    else:
        out = round_shift(e * t, (n + recip_shift).clamp(0, 62)).clamp(0, qmax)
    return out.to(TORCH_DTYPES[out_dtype])


def _exp_of_difference(d: torch.Tensor, exp_table: Optional[torch.Tensor], segments: dict,
                       internal_dtype: str) -> torch.Tensor:
    """exp of d (<= 0) on the internal grid, >= 0: the exact table (index -d, saturated to its last entry) or the
    segmented tables (d saturated to their int16 input)."""
    if exp_table is not None:
        e = torch.take(exp_table.long(), (-d).clamp(0, exp_table.shape[0] - 1))
    else:
        small = segments["points"].dtype
        e = segment_lookup(d.clamp(min=torch.iinfo(small).min).to(small), **segments, odd=False,
                           internal_dtype=internal_dtype, out_shift=0, out_dtype=internal_dtype).long()
    return e.clamp(0, qrange(internal_dtype)[1])


def leading_bit(v: torch.Tensor) -> torch.Tensor:
    """floor(log2(v)) of v >= 1 (int64), by halving steps: integer ops only."""
    n = torch.zeros_like(v)
    for step in (32, 16, 8, 4, 2, 1):
        high = torch.bitwise_right_shift(v, step)
        v, n = torch.where(high > 0, high, v), n + (high > 0).long() * step
    return n


def _mantissa_lookup(total: torch.Tensor, n: torch.Tensor, table: torch.Tensor, fraction_bits: int) -> torch.Tensor:
    """The table (2^b + 1 entries over mantissas [1, 2]) at total / 2^n, interpolated over `fraction_bits` bits."""
    entries = table.shape[0] - 1
    if entries < 1 or entries & (entries - 1):
        raise ValueError(f"softmax_lut: mantissa_table has {entries + 1} entries; it takes 2^b + 1")
    bits = entries.bit_length() - 1
    width = torch.as_tensor(bits + fraction_bits, dtype=torch.int64, device=total.device)
    right = ops.reference.shift_right_round(total, (n - width).clamp(min=0))
    a = torch.where(n > width, right, torch.bitwise_left_shift(total, (width - n).clamp(min=0)))
    whole = torch.bitwise_right_shift(a, fraction_bits)
    j, fraction = (whole - (1 << bits)).clamp(0, entries), a - torch.bitwise_left_shift(whole, fraction_bits)
    low, high = torch.take(table.long(), j), torch.take(table.long(), (j + 1).clamp(max=entries))
    return low + torch.bitwise_right_shift((high - low) * fraction + ((1 << fraction_bits) >> 1), fraction_bits)
