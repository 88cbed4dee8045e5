"""Look-up tables: how a nonlinear element-wise op f (sigmoid, tanh, SiLU, GELU, exp, ...) runs in integers on J5.

Everything here runs once, at convert time, in float64; the tables and integer parameters it returns are stored in
the quantized module and in the program, and the kernels (`kernels.lookup`, ...) use nothing else at run time.
See ../shared/J5_ARITHMETIC.md, "Look-up tables".

- int8 input: one table with an entry per input value (256), out[q] = round_half_up(f(q * s_in) / s_out)
  saturated to the output dtype: exact for any f, whatever the output dtype.
- int16 input (`segment_table`, run by `kernels.segment_lookup`): a line y = k*x + b left of the first dividing
  point and right of the last, and 6 tables of 64 int16 entries between the 7 points, each entered through a
  fixed-point index map and interpolated linearly between neighbouring entries; computed on the int16 grid (an int8
  output is (v + 128) >> 8). Rounding half up everywhere; the numbers (6, 64, index bits) are the profile's. The
  table ends drop the inputs where f is flat on the output grid (a flat line is exact there); the dividing points
  split the rest evenly, by equal shares of |f''| (the reference's "curvature") or, by default, so that the largest
  interpolation error max|f''| * h^2 / 8 of the six tables is the smallest ("minimax": equal shares of |f''| leave
  the flat end of exp, log, 1/x in one wide table; benchmarks/RESULTS.md, "Look-up tables").
- softmax / log_softmax over a dim (`softmax_params`, run by `kernels.softmax_lut`): exp of d = x - max(x) by an
  exact table (int8 input, 256 entries) or a segmented one (int16 input), the int32 sum S = 2^n * m normalized, and
  a table of 2^8 + 1 entries over the mantissa m in [1, 2] (interpolated, 8 fraction bits): 2^K / (m * s_out) for
  softmax, ln(m) * 2^F / s_out for log_softmax.
Values f cannot give (log 0, 1/0, sqrt of a negative) are defined here, once: NaN -> 0, +-inf -> the output's
saturation bound.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from hat.integer.arith import multiplier_and_shift
from hat.integer.kernels import segment_lookup
from hat.integer.profile import TORCH_DTYPES, Profile

FloatFunction = Callable[[torch.Tensor], torch.Tensor]


def on_output_grid(y: torch.Tensor, out_scale: float, out_dtype: str, profile: Profile) -> torch.Tensor:
    """float64 results -> integers of `out_dtype`: y / s_out rounded half up and saturated; NaN -> 0."""
    qmin, qmax = profile.qrange(out_dtype)
    steps = torch.nan_to_num(y.double() / out_scale, nan=0.0, posinf=float(qmax), neginf=float(qmin))
    return torch.floor(steps + 0.5).clamp(qmin, qmax).to(TORCH_DTYPES[out_dtype])


def exact_table(fn: FloatFunction, in_scale: float, in_dtype: str, out_scale: float, out_dtype: str,
                profile: Profile) -> torch.Tensor:
    """The table of f over every integer of `in_dtype` (index q - qmin), on the output grid."""
    qmin, qmax = profile.qrange(in_dtype)
    x = torch.arange(qmin, qmax + 1, dtype=torch.float64) * float(in_scale)
    with torch.no_grad():
        return on_output_grid(fn(x), float(out_scale), out_dtype, profile)


# --- segmented table: int16 inputs -----------------------------------------------------------------------------------
SPLITS = ("evenly", "curvature", "minimax")
_CURVATURE_SAMPLES = 4096  # at least this many samples of f between the table's ends to estimate |f''|
_BISECTIONS = 40  # on the error bound of "minimax" (relative precision 2^-40)


def internal_scale(out_scale: float, out_dtype: str, profile: Profile) -> float:
    """The scale of the int16 grid a segmented table computes on: the output's, or 2^-8 of it for an int8 output."""
    return float(out_scale) / 2 ** profile.lut_output_shift(out_dtype)


def segment_table(fn: FloatFunction, in_scale: float, in_dtype: str, out_scale: float, out_dtype: str, *,
                  odd: bool = False, input_range: Optional[tuple[float, float]] = None, split: str = "minimax",
                  profile: Profile) -> dict[str, Any]:
    """The keyword arguments of kernels.segment_lookup for f: "points" (int16 [7], input integers, rising),
    "tables" (int16 [6, 64], internal grid), "index_multiplier", "index_shift", "index_bits" (int16 [6]: table i's
    fixed-point index), "line_multiplier", "line_shift" (int16 [2]) and "line_offset" (int32 [2]: the lines left of
    points[0] and right of points[-1]), "odd" (bool: over |x|, the sign mirrored), "internal_dtype" and "out_shift"
    (the profile's table grid and the shift from it to out_dtype), "out_dtype". Table ends: the input
    range, narrowed by `input_range` (real units) and to where f is not flat on the output grid."""
    if split not in SPLITS:
        raise ValueError(f"split '{split}': use one of {', '.join(SPLITS)}")
    s_in, s_int, shift = float(in_scale), internal_scale(out_scale, out_dtype, profile), profile.lut_output_shift(
        out_dtype)
    first, n, top = _domain(in_dtype, odd, profile)
    with torch.no_grad():
        y = fn((torch.arange(n, dtype=torch.float64) + first) * s_in)
    out, target = on_output_grid(y, float(out_scale), out_dtype, profile).long(), _targets(y, s_int, profile)
    d0, d6 = _table_ends(out, *_narrowed(first, top, s_in, odd, input_range), top, profile.lut_tables)
    left = _end_line(out, target, 0, d0 - 1, d0, shift, profile)
    right = _end_line(out, target, d6 + 1, n - 1, d6, shift, profile)
    points = _dividing_points(fn, s_in, s_int, d0 + first, target[d0:d6 + 1], split, profile)
    spans = list(zip(points, points[1:]))
    multipliers, shifts, bits = zip(*(_index_map(b - a, profile) for a, b in spans))
    small = lambda values: torch.tensor(values, dtype=torch.int16)  # noqa: E731
    tables = torch.stack([_entries(fn, s_in, s_int, a, b, profile) for a, b in spans])
    return {"points": small(points), "tables": tables,
            "index_multiplier": small(multipliers), "index_shift": small(shifts), "index_bits": small(bits),
            "line_multiplier": small([left[0], right[0]]), "line_shift": small([left[1], right[1]]),
            "line_offset": torch.tensor([left[2], right[2]], dtype=torch.int32), "odd": bool(odd),
            "internal_dtype": profile.lut_internal_dtype, "out_shift": shift, "out_dtype": out_dtype}


def _domain(in_dtype: str, odd: bool, profile: Profile) -> tuple[int, int, int]:
    """(first input integer, how many, last index a dividing point may take): |x| from 0 when odd (|min| included)."""
    qmin, qmax = profile.qrange(in_dtype)
    return (0, -qmin + 1, qmax) if odd else (qmin, qmax - qmin + 1, qmax - qmin)


def _targets(y: torch.Tensor, s_int: float, profile: Profile) -> torch.Tensor:
    """f on the internal grid in float64, before rounding: the unreachable (NaN, inf) as on_output_grid, saturated."""
    qmin, qmax = profile.qrange(profile.lut_internal_dtype)
    return torch.nan_to_num(y / s_int, nan=0.0, posinf=float(qmax), neginf=float(qmin)).clamp(qmin, qmax)


def _narrowed(first: int, top: int, s_in: float, odd: bool, input_range: Optional[tuple[float, float]]
              ) -> tuple[int, int]:
    """Index span of the user's input range (all of it when None); |range| when odd."""
    if input_range is None:
        return 0, top
    low, high = map(float, input_range)
    if odd:
        low, high = (0.0 if low <= 0 <= high else min(abs(low), abs(high))), max(abs(low), abs(high))
    lo, hi = max(0, math.ceil(low / s_in) - first), min(top, math.floor(high / s_in) - first)
    if lo > hi:
        raise ValueError(f"input_range {input_range} holds no input integer of scale {s_in:g}")
    return lo, hi


def _table_ends(out: torch.Tensor, lo: int, hi: int, top: int, tables: int) -> tuple[int, int]:
    """Indices [d0, d6]: [lo, hi] less the ends where the output is flat (the first and last differing inputs),
    widened to `tables` steps when narrower."""
    changes = torch.nonzero(out[1:] != out[:-1]).flatten()
    first, last = (int(changes[0]) + 1, int(changes[-1])) if len(changes) else (len(out), -1)
    d0, d6 = max(lo, first), min(hi, last)
    if d6 - d0 < tables:
        d0 = min(max((d0 + d6) // 2 - tables // 2, 0), top - tables)
        d6 = d0 + tables
    return d0, d6


def _end_line(out: torch.Tensor, target: torch.Tensor, first: int, last: int, anchor: int, shift: int,
              profile: Profile) -> tuple[int, int, int]:
    """(multiplier, shift, offset) of the line y = offset + (((i - anchor) * multiplier) >> shift) over indices
    [first, last]: the flat output value where f is flat there, else the chord of f."""
    if last < first:
        return 0, 0, 0
    if bool((out[first:last + 1] == out[first]).all()):
        return 0, 0, int(out[first]) << shift
    slope = float(target[last] - target[first]) / (last - first)
    near = last if anchor > last else first
    multiplier, n = _fixed_point(slope, profile)
    low, high = profile.qrange(profile.accumulator_dtype)
    return multiplier, n, min(max(_round_half_up(float(target[near]) + slope * (anchor - near)), low), high)


def _dividing_points(fn: FloatFunction, s_in: float, s_int: float, d0: int, y: torch.Tensor, split: str,
                     profile: Profile) -> list[int]:
    """d0 < d1 < ... < d6 (input integers; y: f on the internal grid at d0..d6): equal steps ("evenly"), equal
    shares of |f''| ("curvature", the reference's rule) or the least largest interpolation error ("minimax")."""
    tables, width = profile.lut_tables, len(y) - 1
    if split == "minimax":
        inner = _minimax(y, tables, profile.lut_table_entries - 1)[:-1]
    elif split == "curvature":
        inner = _curvature_shares(fn, s_in, s_int, d0, width, tables, profile)
    else:
        inner = [_round_half_up(k * width / tables) for k in range(1, tables)]
    return _spread([d0, *(d0 + i for i in inner), d0 + width])


def _curvature_shares(fn: FloatFunction, s_in: float, s_int: float, d0: int, width: int, tables: int,
                      profile: Profile) -> list[int]:
    """Offsets from d0 that cut the integral of |f''| (second differences of f, sampled at least
    _CURVATURE_SAMPLES times) into equal shares; equal steps where f'' is 0 throughout."""
    n = max(width, _CURVATURE_SAMPLES)
    with torch.no_grad():
        y = _targets(fn((d0 + torch.arange(n + 1, dtype=torch.float64) * (width / n)) * s_in), s_int, profile)
    mass = (y[2:] - 2 * y[1:-1] + y[:-2]).abs().cumsum(0)
    shares = torch.arange(1, tables, dtype=torch.float64) / tables
    if not float(mass[-1]) > 0:
        return [_round_half_up(float(k) * width) for k in shares]
    return [_round_half_up((int(i) + 1) * width / n) for i in torch.searchsorted(mass, shares * mass[-1])]


def _minimax(y: torch.Tensor, tables: int, intervals: int) -> list[int]:
    """Segment ends (offsets into y, f on consecutive input integers) that make the largest estimated
    interpolation error, max|f''| * (width / intervals)^2 / 8, the smallest: greedy segments, bisection on the bound."""
    curvature = torch.zeros_like(y)
    curvature[1:-1] = (y[2:] - 2 * y[1:-1] + y[:-2]).abs()
    peak = _RangeMax(curvature)
    error = lambda a, b: peak(a + 1, b - 1) * ((b - a) / intervals) ** 2 / 8  # noqa: E731
    low, high = 0.0, error(0, len(y) - 1)
    ends = _greedy(error, len(y) - 1, low, tables)
    for _ in range(0 if ends else _BISECTIONS):
        low, high = (low, (low + high) / 2) if _greedy(error, len(y) - 1, (low + high) / 2, tables) else (
            (low + high) / 2, high)
    ends = ends or _greedy(error, len(y) - 1, high, tables)
    while len(ends) < tables:  # fewer needed (f linear in places): halve the widest
        starts = [0, *ends[:-1]]
        k = max(range(len(ends)), key=lambda i: ends[i] - starts[i])
        ends.insert(k, (starts[k] + ends[k]) // 2)
    return ends


def _greedy(error: Callable[[int, int], float], width: int, bound: float, tables: int) -> Optional[list[int]]:
    """Each segment as wide as `bound` allows (binary search: the error grows with the end); None when `tables`
    segments do not reach `width`."""
    ends = [0]
    while ends[-1] < width and len(ends) <= tables:
        start, low, high = ends[-1], ends[-1] + 1, width
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if error(start, mid) <= bound else (low, mid - 1)
        ends.append(low)
    return ends[1:] if ends[-1] >= width else None


class _RangeMax:
    """max(values[a..b]) in O(1) per query (a sparse table); 0 for an empty range."""

    def __init__(self, values: torch.Tensor):
        self.levels = [values.tolist()]
        while 2 ** len(self.levels) <= len(values):
            half, last = 2 ** (len(self.levels) - 1), torch.tensor(self.levels[-1], dtype=torch.float64)
            self.levels.append(torch.maximum(last[:-half], last[half:]).tolist())

    def __call__(self, a: int, b: int) -> float:
        if b < a:
            return 0.0
        k = (b - a + 1).bit_length() - 1
        return max(self.levels[k][a], self.levels[k][b - 2 ** k + 1])


def _spread(points: list[int]) -> list[int]:
    """Strictly increasing with both ends kept (points that fell together, on a kink, pushed apart by 1)."""
    for k in range(1, len(points) - 1):
        points[k] = max(points[k], points[k - 1] + 1)
    for k in range(len(points) - 2, 0, -1):
        points[k] = min(points[k], points[k + 1] - 1)
    return points


def _index_map(width: int, profile: Profile) -> tuple[int, int, int]:
    """(multiplier, shift, bits): (x - d) * multiplier >> shift is the table index with `bits` fractional bits,
    (entries - 1) * 2^bits at x = d + width; bits as many as the int16 multiplier allows."""
    intervals, bits = profile.lut_table_entries - 1, profile.lut_max_index_bits
    while intervals * 2 ** bits > profile.multiplier_max * width:
        bits -= 1
    return (*_fixed_point(intervals * 2 ** bits / width, profile), bits)


def _entries(fn: FloatFunction, s_in: float, s_int: float, a: int, b: int, profile: Profile) -> torch.Tensor:
    """One table: f at `lut_table_entries` equally spaced inputs from a to b, on the internal grid."""
    intervals = profile.lut_table_entries - 1
    x = (a * intervals + (b - a) * torch.arange(intervals + 1, dtype=torch.float64)) / intervals  # exact at a and b
    with torch.no_grad():
        return on_output_grid(fn(x * s_in), s_int, profile.lut_internal_dtype, profile)


def _fixed_point(value: float, profile: Profile) -> tuple[int, int]:
    """value ~ multiplier / 2^shift, |multiplier| <= multiplier_max, with the largest shift (saturated if larger)."""
    if value == 0:
        return 0, 0
    shift = 0
    while shift < profile.max_shift and abs(_round_half_up(value * 2 ** (shift + 1))) <= profile.multiplier_max:
        shift += 1
    limit = profile.multiplier_max
    return min(max(_round_half_up(value * 2 ** shift), -limit), limit), shift


def _round_half_up(v: float) -> int:
    return math.floor(v + 0.5)


# --- softmax / log_softmax over a dim: exp of d = x - max, the sum's mantissa table ---------------------------------
SOFTMAX_MANTISSA_BITS = 8  # the sum's mantissa table: 2^8 + 1 entries over mantissas [1, 2]
SOFTMAX_FRACTION_BITS = 8  # interpolation bits between entries: the mantissa is rounded to 16 fraction bits
RECIPROCAL_MAX = 2 ** 16 - 1  # reciprocal entries: an exp value (< 2^15) times an entry stays below 2^31 (int32)
LOG_CONSTANT_MAX = 2 ** 31 - 1  # log_softmax's stored constants and entries are int32


def softmax_params(in_scale: float, in_dtype: str, out_scale: float, out_dtype: str, *, log: bool,
                   profile: Profile) -> dict[str, Any]:
    """The keyword arguments of kernels.softmax_lut (all but `dim`) for these scales: the exp stage ("exp_table"
    for an int8 input, else the segmented-table tensors of segment_table, "d_shift", "internal_dtype"), the sum's
    mantissa table ("mantissa_table", "fraction_bits") and "recip_shift" (softmax) or "multiplier", "shift",
    "ln2", "log_offset" (log_softmax). ValueError when the scales leave the integer ranges."""
    exp = _exp_stage(float(in_scale), in_dtype, profile)
    e_top = int(exp.pop("e_top"))
    if e_top < 1:
        raise ValueError(f"exp(0) is {e_top} on the {profile.lut_internal_dtype} grid; the sum would be 0")
    params = dict(exp, mantissa_table=None, fraction_bits=SOFTMAX_FRACTION_BITS, recip_shift=None, multiplier=None,
                  shift=None, ln2=None, log_offset=None, log=bool(log), out_dtype=out_dtype)
    grid = profile.qrange(profile.lut_internal_dtype)[1]  # exp(0) on the table grid: e = exp(d * s) * grid
    if log:
        params.update(_log_stage(float(in_scale), float(out_scale), grid, profile))
    else:
        params.update(_reciprocal_stage(float(out_scale), e_top.bit_length() - 1))
    return params


def _exp_stage(s_in: float, in_dtype: str, profile: Profile) -> dict[str, Any]:
    """exp(d * s_in) on the internal grid (exp(0) = its qmax): an exact table over d in [-(qmax - qmin), 0] (256
    entries for int8, index -d); for a wider input a segmented table over d' = d >> d_shift (rounded) saturated to
    int16: d_shift 1 only when exp is still above half a grid step below d = -32768 (s_in < ln(2 qmax) / 32768)."""
    internal = profile.lut_internal_dtype
    grid = profile.qrange(internal)[1]
    qmin, qmax = profile.qrange(in_dtype)
    if in_dtype == "qint8":
        d = -torch.arange(qmax - qmin + 1, dtype=torch.float64) * s_in
        table = on_output_grid(torch.exp(d), 1.0 / grid, internal, profile)
        return {"exp_table": table, "d_shift": 0, "internal_dtype": internal, "e_top": int(table[0])}
    low = profile.qrange("qint16")[0]
    reach, d_shift = math.log(2 * grid) / s_in, 0  # d beyond -reach: exp below half a step, 0 on the grid
    while reach / 2 ** d_shift > -low and (qmax - qmin) / 2 ** d_shift > -low:
        d_shift += 1
    s_d = s_in * 2 ** d_shift
    segments = segment_table(torch.exp, s_d, "qint16", 1.0 / grid, internal, input_range=(low * s_d, 0.0),
                             profile=profile)
    keep = ("points", "tables", "index_multiplier", "index_shift", "index_bits", "line_multiplier", "line_shift",
            "line_offset")
    params = {k: segments[k] for k in keep}
    top = segment_lookup(torch.zeros(1, dtype=torch.int16), **params, odd=False, internal_dtype=internal,
                         out_shift=0, out_dtype=internal)
    return dict(params, exp_table=None, d_shift=d_shift, internal_dtype=internal, e_top=int(top[0]))


def _mantissas() -> torch.Tensor:
    """The table's mantissas 1 + i / 2^bits, i = 0 .. 2^bits (float64)."""
    entries = 2 ** SOFTMAX_MANTISSA_BITS
    return 1 + torch.arange(entries + 1, dtype=torch.float64) / entries


def _reciprocal_stage(s_out: float, least_bit: int) -> dict[str, Any]:
    """Entries round_half_up(2^K / (m * s_out)) (the output scale folded in), K as large as keeps them <= 2^16 - 1;
    out = (e * entry) >> (n + K). `least_bit`: the sum's smallest leading-bit position (that of exp(0))."""
    top = 1.0 / s_out
    k = math.floor(math.log2(RECIPROCAL_MAX / top))
    while _round_half_up(top * 2.0 ** k) > RECIPROCAL_MAX:
        k -= 1
    if least_bit + k < 0:
        raise ValueError(f"output scale {s_out:g} is too small for the reciprocal table (1 / scale above "
                         f"{RECIPROCAL_MAX * 2 ** least_bit})")
    table = torch.floor(2.0 ** k / (_mantissas() * s_out) + 0.5).to(torch.int32)
    return {"mantissa_table": table, "recip_shift": k}


def _log_stage(s_in: float, s_out: float, grid: int, profile: Profile) -> dict[str, Any]:
    """log_softmax = d * s_in - ln(S / grid), S = 2^n * m: in units of s_out / 2^F, d * multiplier - n * ln2 -
    table(m) + log_offset, then (v + 2^(F-1)) >> F. multiplier / 2^F ~ s_in / s_out (int16 multiplier), F lowered
    until the constants (ln(grid) * 2^F / s_out the largest) fit int32."""
    multiplier, shift = (int(v) for v in multiplier_and_shift(torch.tensor(s_in / s_out), profile))
    if shift == 0 and s_in / s_out > profile.multiplier_max:
        raise ValueError(f"input scale {s_in:g} is over {profile.multiplier_max} times the output scale {s_out:g}")
    while shift > 0 and _round_half_up(max(math.log(grid), math.log(2)) * 2.0 ** shift / s_out) > LOG_CONSTANT_MAX:
        shift -= 1
        multiplier = _round_half_up(s_in / s_out * 2.0 ** shift)
    if multiplier < 1:
        raise ValueError(f"input scale {s_in:g} is too small next to the output scale {s_out:g} for log_softmax")
    unit = 2.0 ** shift / s_out
    table = torch.floor(torch.log(_mantissas()) * unit + 0.5).to(torch.int32)
    return {"mantissa_table": table, "multiplier": multiplier, "shift": shift,
            "ln2": _round_half_up(math.log(2) * unit), "log_offset": _round_half_up(math.log(grid) * unit)}
