"""The J5 integer ops, as plain functions of integer tensors: the one implementation of each op.

The quantized modules (hat.quant) call them in forward and the integer program (program.py) calls them with the
parameters stored in its file, so the two are bit-exact by construction; `KERNELS` is the op set of the IR.
Runtime inputs are positional; everything fixed at compile time (weights, multipliers, shapes) is a keyword.

Convolutions accumulate in float32 when every partial sum is an integer below 2^24 (exact), if need be over chunks
of the input channels added in int64 (`accumulate`, `splits`: chosen from the weights and the input dtype by
accumulate_plan), else in float64 (exact below 2^53).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from hat import ops
from hat.integer.profile import TORCH_DTYPES, qrange
from hat.ops.reference import round_grid

FLOAT32_EXACT = 2 ** 24
ACCUMULATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def along_axis(values: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """Shape per-channel `values` ([C]) to broadcast along `axis` of `like`."""
    shape = [1] * like.ndim
    shape[axis] = -1
    return values.reshape(shape)


def accumulator_bound(weight_int: torch.Tensor, input_dtype: str) -> int:
    """The largest |sum| a filter can reach before the bias: max over channels of sum|w| * max|x|."""
    qmin, qmax = qrange(input_dtype)
    per_filter = weight_int.reshape(len(weight_int), -1).abs().sum(1, dtype=torch.int64)
    return int(per_filter.max()) * max(-qmin, qmax) if per_filter.numel() else 0


def accumulate_plan(weight_int: torch.Tensor, input_dtype: str, groups: int = 1, max_splits: int = 8) -> dict:
    """How a conv/linear accumulates exactly: {"accumulate": "float32", "splits": k} when splitting the input
    channels into k chunks (torch.tensor_split) keeps every chunk's partial sums below 2^24, else float64."""
    qmin, qmax = qrange(input_dtype)
    per_input = weight_int.reshape(weight_int.shape[0], weight_int.shape[1], -1).abs().sum(2, dtype=torch.int64)
    splits_allowed = 1 if groups != 1 else min(max_splits, weight_int.shape[1])
    for splits in range(1, splits_allowed + 1):
        chunks = torch.tensor_split(per_input, splits, dim=1)
        if max(int(c.sum(1).max()) if c.numel() else 0 for c in chunks) * max(-qmin, qmax) < FLOAT32_EXACT:
            return {"accumulate": "float32", "splits": splits}
    return {"accumulate": "float64", "splits": 1}


def requantize(acc: torch.Tensor, multiplier: Any, shift: Any, out_dtype: str, axis: Optional[int] = None):
    """int accumulator -> out_dtype: (acc * m + 2^(n-1)) >> n, saturated; m, n per tensor (ints) or per channel."""
    qmin, qmax = qrange(out_dtype)
    multiplier, shift = torch.as_tensor(multiplier), torch.as_tensor(shift)
    return ops.requantize(acc, multiplier, shift, axis if multiplier.numel() > 1 else None, qmin, qmax,
                          TORCH_DTYPES[out_dtype])


# --- model boundary ------------------------------------------------------------------------------------------------
def quantize(x: torch.Tensor, *, scale: torch.Tensor, dtype: str) -> torch.Tensor:
    """float -> integers: round half up of x / scale, saturated to dtype."""
    qmin, qmax = qrange(dtype)
    return round_grid(x / scale, half_up=True).clamp(qmin, qmax).to(TORCH_DTYPES[dtype])


def dequantize(q: torch.Tensor, *, scale: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """integers -> float32; a per-channel scale (high-precision outputs) broadcasts along `axis`."""
    scale = along_axis(scale, q, axis) if scale.numel() > 1 else scale
    return (q.double() * scale.double()).float()  # float64 keeps int32 values exact


# --- conv / linear -------------------------------------------------------------------------------------------------
def conv2d(x: torch.Tensor, *, weight: torch.Tensor, bias: torch.Tensor, stride, padding, dilation, groups: int,
           accumulate: str, splits: int, relu: bool, multiplier: Optional[torch.Tensor],
           shift: Optional[torch.Tensor], acc_max: Optional[torch.Tensor], out_max: Optional[int],
           out_dtype: str) -> torch.Tensor:
    """int8/int16 conv, exact integer accumulation, int32 bias, relu; requantized (or the int32 accumulator)."""
    compute = lambda a, w: F.conv2d(a, w, None, stride, padding, dilation, groups)  # noqa: E731
    acc = _accumulate(compute, x, weight, 1, accumulate, splits)
    return _finish(acc, bias, 1, relu, multiplier, shift, acc_max, out_max, out_dtype)


def linear(x: torch.Tensor, *, weight: torch.Tensor, bias: torch.Tensor, accumulate: str, splits: int, relu: bool,
           multiplier: Optional[torch.Tensor], shift: Optional[torch.Tensor], acc_max: Optional[torch.Tensor],
           out_max: Optional[int], out_dtype: str) -> torch.Tensor:
    """x @ W^T exactly in integers, int32 bias, relu; requantized (or the int32 accumulator)."""
    acc = _accumulate(F.linear, x, weight, -1, accumulate, splits)
    return _finish(acc, bias, -1, relu, multiplier, shift, acc_max, out_max, out_dtype)


def _accumulate(compute: Callable, x: torch.Tensor, weight: torch.Tensor, input_axis: int, accumulate: str,
                splits: int) -> torch.Tensor:
    """The exact integer sums as int64: one float conv, or `splits` float32 convs over chunks of the input
    channels (each exact below 2^24) added in int64."""
    dtype = ACCUMULATE_DTYPES[accumulate]
    if splits == 1:
        return torch.round(compute(x.to(dtype), weight.to(dtype))).long()
    pairs = zip(torch.tensor_split(x, splits, dim=input_axis), torch.tensor_split(weight, splits, dim=1))
    return sum(torch.round(compute(xs.to(dtype), ws.to(dtype))).long() for xs, ws in pairs)


def _finish(acc: torch.Tensor, bias: torch.Tensor, axis: int, relu: bool, multiplier: Optional[torch.Tensor],
            shift: Optional[torch.Tensor], acc_max: Optional[torch.Tensor], out_max: Optional[int],
            out_dtype: str) -> torch.Tensor:
    """bias on the int32 accumulator, saturate, relu; then requantize (or keep int32: a high-precision output)."""
    qmin, qmax = qrange("qint32")
    acc = (acc + along_axis(bias, acc, axis)).clamp_(min=0 if relu else qmin, max=qmax)
    if multiplier is None:
        if acc_max is not None:  # relu6 on the accumulator's per-channel grid
            acc = torch.minimum(acc, along_axis(acc_max, acc, axis))
        return acc.to(torch.int32)
    out = requantize(acc, multiplier, shift, out_dtype, axis)
    return out.clamp_(max=min(out_max, qrange(out_dtype)[1])) if out_max is not None else out


# --- tensor-tensor arithmetic (FloatFunctional) ---------------------------------------------------------------------
def add(x: torch.Tensor, y: torch.Tensor, *, x_shift: int, x_sign: int, y_multiplier: int, multiplier: int,
        shift: int, out_dtype: str) -> torch.Tensor:
    """J5 add: ((x << x_shift) * x_sign + y * y_multiplier), requantized; x is the operand with the larger scale."""
    acc = x_sign * (x.long() << x_shift) + y.long() * y_multiplier
    return requantize(acc, multiplier, shift, out_dtype)


def mul(x: torch.Tensor, y: torch.Tensor, *, multiplier: int, shift: int, out_dtype: str) -> torch.Tensor:
    """x * y of two activations (broadcasting), requantized."""
    return requantize(x.long() * y.long(), multiplier, shift, out_dtype)


def add_scalar(x: torch.Tensor, *, x_shift: int, constant: int, multiplier: int, shift: int,
               out_dtype: str) -> torch.Tensor:
    """(x << x_shift) + constant, requantized: x + c on a scale of its own."""
    return requantize((x.long() << x_shift) + constant, multiplier, shift, out_dtype)


def mul_scalar(x: torch.Tensor, *, sign: int, multiplier: int, shift: int, out_dtype: str) -> torch.Tensor:
    """x * c: the sign, then requantized to the output scale."""
    return requantize(x.long() * sign, multiplier, shift, out_dtype)


def cat(*xs: torch.Tensor, dim: int, multipliers: Sequence[int], shifts: Sequence[int],
        out_dtype: str) -> torch.Tensor:
    """Each input requantized to the output scale, then concatenated."""
    return torch.cat([requantize(x.long(), m, n, out_dtype) for x, m, n in zip(xs, multipliers, shifts)], dim)


# --- ops that keep the grid ----------------------------------------------------------------------------------------
def identity(x: torch.Tensor) -> torch.Tensor:
    """Data unchanged; only the scale differs (x * positive constant)."""
    return x


def clip(x: torch.Tensor, *, low: Optional[int], high: Optional[int]) -> torch.Tensor:
    """relu (low 0), relu6/hardtanh (both), saturated to x's dtype (bounds may lie outside it)."""
    if low is None and high is None:
        return x
    info = torch.iinfo(x.dtype)
    return x.to(torch.int32).clamp(min=low, max=high).clamp(info.min, info.max).to(x.dtype)


def add_steps(x: torch.Tensor, *, steps: int, negate: bool = False) -> torch.Tensor:
    """(-x if negate else x) + steps, saturated to x's dtype: x + constant and -x on the same grid."""
    info = torch.iinfo(x.dtype)
    wide = -x.to(torch.int32) if negate else x.to(torch.int32)
    return (wide + steps).clamp(info.min, info.max).to(x.dtype)


def max_pool2d(x: torch.Tensor, *, kernel_size, stride, padding, dilation, ceil_mode: bool) -> torch.Tensor:
    """Max over windows: the integers keep their grid."""
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


def avg_pool2d(x: torch.Tensor, *, kernel_size, stride, padding, multiplier: int, shift: int,
               out_dtype: str) -> torch.Tensor:
    """Window sums (int32 on the device) times 1/area as multiplier and shift."""
    sums = F.avg_pool2d(x.double(), kernel_size, stride, padding, False, True, divisor_override=1)
    return requantize(torch.round(sums).long(), multiplier, shift, out_dtype)


def global_avg_pool(x: torch.Tensor, *, multiplier: int, shift: int, out_dtype: str) -> torch.Tensor:
    """Sum over H, W times 1/area as multiplier and shift."""
    return requantize(x.long().sum(dim=(-2, -1), keepdim=True), multiplier, shift, out_dtype)


def resize_nearest(x: torch.Tensor, *, size=None, scale_factor=None) -> torch.Tensor:
    """Nearest-neighbour resize: the integers keep their grid."""
    return F.interpolate(x.float(), size=size, scale_factor=scale_factor, mode="nearest").to(x.dtype)


def layout(x: torch.Tensor, *, method: str, args: Sequence = (), kwargs: Optional[dict] = None) -> torch.Tensor:
    """reshape/view/flatten/permute/transpose/squeeze/unsqueeze/contiguous: torch.Tensor's method of that name."""
    if method not in LAYOUT_METHODS:
        raise ValueError(f"layout: unknown method '{method}'; known: {', '.join(LAYOUT_METHODS)}")
    return getattr(x, method)(*args, **(kwargs or {}))


LAYOUT_METHODS = ("flatten", "reshape", "view", "permute", "transpose", "squeeze", "unsqueeze", "contiguous")


def index(x: torch.Tensor, *, items: Sequence) -> torch.Tensor:
    """Basic indexing: items are ints, None, "..." or [start, stop, step] slices (JSON-friendly x[...])."""
    return x[tuple(decode_index(items))]


def encode_index(key: Any) -> list:
    """x[key] as JSON-friendly items; raises TypeError for advanced (tensor or list) indexing."""
    items = []
    for item in key if isinstance(key, tuple) else (key,):
        if isinstance(item, slice):
            items.append([item.start, item.stop, item.step])
        elif item is Ellipsis:
            items.append("...")
        elif item is None or (isinstance(item, int) and not isinstance(item, bool)):
            items.append(item)
        else:
            raise TypeError(f"index {type(item).__name__}")
    return items


def decode_index(items: Sequence) -> list:
    return [slice(*i) if isinstance(i, list) else Ellipsis if i == "..." else i for i in items]


def concat(*xs: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenation of inputs already on one grid (equal scales and dtypes)."""
    return torch.cat(xs, dim)


def grid_sample(x: torch.Tensor, grid: torch.Tensor, *, grid_scale: torch.Tensor, coord_shift: int, mode: str,
                padding_mode: str) -> torch.Tensor:
    """J5 grid sample; the grid (quantized offsets in pixels) becomes int16 fixed point with coord_shift bits."""
    offsets = dequantize(grid, scale=grid_scale) if not grid.is_floating_point() else grid
    fixed = round_grid(offsets * 2 ** coord_shift, half_up=True).clamp(-32768, 32767).to(torch.int16)
    return ops.grid_sample(x, fixed, coord_shift, mode, padding_mode)


def mean(x: torch.Tensor, *, dims: Sequence[int], keepdim: bool, multiplier: int, shift: int,
         out_dtype: str) -> torch.Tensor:
    """Integer sums over `dims` (int32 on the device) times 1/count as multiplier and shift."""
    return requantize(x.long().sum(dim=list(dims), keepdim=keepdim), multiplier, shift, out_dtype)


def extremum(x: torch.Tensor, y: torch.Tensor, *, minimum: bool, multipliers: Sequence[int], shifts: Sequence[int],
             out_dtype: str) -> torch.Tensor:
    """Both inputs requantized to the output scale, then their element-wise max (min when `minimum`)."""
    a, b = (requantize(v.long(), m, n, out_dtype) for v, m, n in zip((x, y), multipliers, shifts))
    return torch.minimum(a, b) if minimum else torch.maximum(a, b)


def prelu(x: torch.Tensor, *, pos_multiplier: int, pos_shift: int, neg_multiplier: torch.Tensor,
          neg_shift: torch.Tensor, channel_axis: int, out_dtype: str) -> torch.Tensor:
    """PReLU, exact piecewise-linear (no table): x >= 0 and x < 0 each requantized by its own multiplier and shift.
    x >= 0: (pos_multiplier, pos_shift) = s_in / s_out; x < 0: (neg_multiplier[c], neg_shift[c]) = slope[c] * s_in /
    s_out, a signed int16 multiplier, one value or one per channel along `channel_axis`."""
    acc = x.long()
    positive = requantize(acc, pos_multiplier, pos_shift, out_dtype)
    negative = requantize(acc, neg_multiplier, neg_shift, out_dtype, channel_axis)
    return torch.where(acc >= 0, positive, negative)


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
    n = _leading_bit(total)
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


def _leading_bit(v: torch.Tensor) -> torch.Tensor:
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

KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    f.__name__: f for f in (quantize, dequantize, conv2d, linear, add, mul, add_scalar, mul_scalar, cat, identity,
                            clip, add_steps, max_pool2d, avg_pool2d, global_avg_pool, resize_nearest, layout, index,
                            concat, grid_sample, mean, extremum, lookup, segment_lookup, softmax_lut, prelu)}
