"""The J5 integer ops, as plain functions of integer tensors: the one implementation of each op.

The quantized modules (hat.quant) call them in forward and the integer program (program.py) calls them with the
parameters stored in its file, so the two are bit-exact by construction; `KERNELS` is the op set of the IR.
Runtime inputs are positional; everything fixed at compile time (weights, multipliers, shapes) is a keyword.

These are the reference kernels: they define the arithmetic, simply. Convolutions accumulate in float32 when every
partial sum is an integer below 2^24 (exact), if need be over chunks of the input channels added in int64 (chosen
from the weights and the input dtype by accumulate_plan), else in float64 (exact below 2^53). The fast executor
(hat.integer.fast) runs the same ops as int8 GEMMs and is tested bit-exact against these.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from hat import ops
from hat.integer.profile import TORCH_DTYPES, dtype_name, qrange
from hat.integer.table_kernels import lookup, segment_lookup, softmax_lut
from hat.ops.reference import round_grid, shift_right_round

FLOAT32_EXACT = 2 ** 24
ACCUMULATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def along_axis(values: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """Shape per-channel `values` ([C]) to broadcast along `axis` of `like`."""
    shape = [1] * like.ndim
    shape[axis] = -1
    return values.reshape(shape)


def accumulator_bound(weight_int: torch.Tensor, input_dtype: str, bias: Optional[torch.Tensor] = None) -> int:
    """The largest |sum| a filter can reach: max over channels of sum|w| * max|x|, plus max|bias| when given."""
    qmin, qmax = qrange(input_dtype)
    per_filter = weight_int.reshape(len(weight_int), -1).long().abs().sum(1)  # int8 abs(-128) wraps
    worst = int(per_filter.max()) * max(-qmin, qmax) if per_filter.numel() else 0
    return worst + (int(bias.long().abs().max()) if bias is not None and bias.numel() else 0)


def accumulate_plan(weight_int: torch.Tensor, input_dtype: str, groups: int = 1, max_splits: int = 8) -> dict:
    """How a conv/linear accumulates exactly: {"accumulate": "float32", "splits": k} when splitting the input
    channels into k chunks (torch.tensor_split) keeps every chunk's partial sums below 2^24, else float64. A meta
    weight (a shape-only dry run) has no values to bound: float64."""
    if weight_int.device.type == "meta":
        return {"accumulate": "float64", "splits": 1}
    qmin, qmax = qrange(input_dtype)
    per_input = weight_int.reshape(weight_int.shape[0], weight_int.shape[1], -1).long().abs().sum(2)
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
           relu: bool, multiplier: Optional[torch.Tensor], shift: Optional[torch.Tensor],
           acc_max: Optional[torch.Tensor], out_max: Optional[int], out_dtype: str) -> torch.Tensor:
    """int8/int16 conv, exact integer accumulation, int32 bias, relu; requantized (or the int32 accumulator)."""
    acc = conv_sums(x, weight, stride, padding, dilation, groups)
    return _finish(acc, bias, 1, relu, multiplier, shift, acc_max, out_max, out_dtype)


def conv_sums(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
              plan: Optional[dict] = None) -> torch.Tensor:
    """The conv's exact integer sums as int64, the float convs chosen by `plan` (default: accumulate_plan's)."""
    plan = plan or accumulate_plan(weight, dtype_name(x.dtype), groups)
    compute = lambda a, w: F.conv2d(a, w, None, stride, padding, dilation, groups)  # noqa: E731
    return _accumulate(compute, x, weight, 1, **plan)


def linear(x: torch.Tensor, *, weight: torch.Tensor, bias: torch.Tensor, relu: bool,
           multiplier: Optional[torch.Tensor], shift: Optional[torch.Tensor], acc_max: Optional[torch.Tensor],
           out_max: Optional[int], out_dtype: str) -> torch.Tensor:
    """x @ W^T exactly in integers, int32 bias, relu; requantized (or the int32 accumulator)."""
    acc = linear_sums(x, weight)
    return _finish(acc, bias, -1, relu, multiplier, shift, acc_max, out_max, out_dtype)


def linear_sums(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ W^T's exact integer sums as int64, the float matmuls chosen by accumulate_plan."""
    return _accumulate(F.linear, x, weight, -1, **accumulate_plan(weight, dtype_name(x.dtype)))


def _accumulate(compute: Callable, x: torch.Tensor, weight: torch.Tensor, input_axis: int, accumulate: str,
                splits: int) -> torch.Tensor:
    """The exact integer sums as int64: one float conv, or `splits` float32 convs over chunks of the input
    channels (each exact below 2^24) added in int64."""
    dtype = ACCUMULATE_DTYPES[accumulate]
    if splits == 1:
        return torch.round(compute(x.to(dtype), weight.to(dtype))).long()
    pairs = zip(torch.tensor_split(x, splits, dim=input_axis), torch.tensor_split(weight, splits, dim=1))
    return sum(torch.round(compute(xs.to(dtype), ws.to(dtype))).long() for xs, ws in pairs)


def _finish(acc: torch.Tensor, bias: Optional[torch.Tensor], axis: int, relu: bool, multiplier: Optional[torch.Tensor],
            shift: Optional[torch.Tensor], acc_max: Optional[torch.Tensor], out_max: Optional[int],
            out_dtype: str) -> torch.Tensor:
    """bias on the int32 accumulator, saturate, relu; then requantize (or keep int32: a high-precision output)."""
    qmin, qmax = qrange("qint32")
    acc = (acc + along_axis(bias, acc, axis) if bias is not None else acc).clamp_(min=0 if relu else qmin, max=qmax)
    if multiplier is None:
        if acc_max is not None:  # relu6 on the accumulator's per-channel grid
            acc = torch.minimum(acc, along_axis(acc_max, acc, axis))
        return acc.to(torch.int32)
    out = requantize(acc, multiplier, shift, out_dtype, axis)
    return out.clamp_(max=min(out_max, qrange(out_dtype)[1])) if out_max is not None else out


def sum_partials(*parts: torch.Tensor, axis: int, relu: bool, multiplier: Optional[torch.Tensor],
                 shift: Optional[torch.Tensor], acc_max: Optional[torch.Tensor], out_max: Optional[int],
                 out_dtype: str) -> torch.Tensor:
    """The int32 accumulators of one conv/linear split over its input channels (conv2d/linear without
    requantization, the bias in the first), summed exactly; then the layer's relu and requantization."""
    acc = parts[0].long()
    for part in parts[1:]:
        acc = acc + part.long()
    return _finish(acc, None, axis, relu, multiplier, shift, acc_max, out_max, out_dtype)


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
    # torch 2.14's max_pool2d refuses int8 channels-last inputs of 64+ channels ("input_depth * input_height *
    # input_width <= ..."): pool the NCHW copy
    return F.max_pool2d(x.contiguous(), kernel_size, stride, padding, dilation, ceil_mode)


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
    """reshape/view/flatten/permute/transpose/squeeze/unsqueeze/contiguous/roll: torch.Tensor's method of that name."""
    if method not in LAYOUT_METHODS:
        raise ValueError(f"layout: unknown method '{method}'; known: {', '.join(LAYOUT_METHODS)}")
    return getattr(x, method)(*args, **(kwargs or {}))


LAYOUT_METHODS = ("flatten", "reshape", "view", "permute", "transpose", "squeeze", "unsqueeze", "contiguous",
                  "roll")


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


KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    f.__name__: f for f in (quantize, dequantize, conv2d, linear, sum_partials, add, mul, add_scalar, mul_scalar,
                            cat, identity, clip, add_steps, max_pool2d, avg_pool2d, global_avg_pool, resize_nearest,
                            layout, index, concat, grid_sample, mean, extremum, lookup, segment_lookup, softmax_lut, prelu)}


# --- matmul of two activations (attention) -------------------------------------------------------------------------
def matmul_plan(k: int, x_dtype: str, y_dtype: str, max_splits: int = 8) -> dict:
    """How `matmul` sums its K products exactly: {"accumulate": "float32", "splits": s} when each of s chunks of K
    keeps its worst sum (chunk * max|x| * max|y|) below 2^24, else float64 (exact below 2^53)."""
    worst = max(abs(v) for v in qrange(x_dtype)) * max(abs(v) for v in qrange(y_dtype))
    for splits in range(1, min(max_splits, max(k, 1)) + 1):
        if -(-k // splits) * worst < FLOAT32_EXACT:
            return {"accumulate": "float32", "splits": splits}
    return {"accumulate": "float64", "splits": 1}


def matmul(x: torch.Tensor, y: torch.Tensor, *, multiplier: int, shift: int, out_dtype: str) -> torch.Tensor:
    """x @ y of two activations (torch.matmul's broadcasting), exact integer sums, int32, requantized.
    The K products are summed exactly (matmul_plan: float32 chunks below 2^24 added in int64, or float64), the sum
    saturated to the int32 accumulator, then requantized by one multiplier and shift."""
    plan = matmul_plan(x.shape[-1], dtype_name(x.dtype), dtype_name(y.dtype))
    dtype, splits = ACCUMULATE_DTYPES[plan["accumulate"]], plan["splits"]
    pairs = zip(torch.tensor_split(x, splits, dim=-1), torch.tensor_split(y, splits, dim=-2 if y.ndim > 1 else 0))
    acc = sum(torch.round(torch.matmul(xs.to(dtype), ys.to(dtype))).long() for xs, ys in pairs)
    qmin, qmax = qrange("qint32")
    return requantize(acc.clamp_(qmin, qmax), multiplier, shift, out_dtype)


def expand_batch(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x (one sample, batch 1: a learned token) repeated along dim 0 to the batch of `like`."""
    return x.expand(like.shape[0], *x.shape[1:]).contiguous()


KERNELS.update({f.__name__: f for f in (matmul, expand_batch)})


# --- windows with a divisor each, bilinear resize, constant padding (issue 16) -------------------------------------
def _window_matrix(bounds: torch.Tensor, size: int, like: torch.Tensor) -> torch.Tensor:
    """The windows [bounds[i, 0], bounds[i, 1]) over an axis of `size` as a 0/1 float64 matrix [out, size]."""
    bounds = bounds.long().cpu()
    if bounds.numel() and (int(bounds.min()) < 0 or int(bounds.max()) > size):
        raise ValueError(f"window_mean: window bounds {bounds.tolist()} outside the input's [0, {size}]")
    positions = torch.arange(size)
    return ((positions >= bounds[:, :1]) & (positions < bounds[:, 1:])).double().to(like.device)


def window_mean(x: torch.Tensor, *, rows: torch.Tensor, cols: torch.Tensor, multiplier: torch.Tensor,
                shift: torch.Tensor, out_dtype: str) -> torch.Tensor:
    """Sums over windows rows[i] x cols[j] (int32), each times its own multiplier[i, j] / 2^shift[i, j].

    Windows [rows[i, 0], rows[i, 1]) x [cols[j, 0], cols[j, 1]) of any sizes, overlapping or repeated, the sum rounded
    half up as in requantization: adaptive_avg_pool2d of any output size, avg_pool2d with ceil_mode or
    count_include_pad=False. The sums are exact: 0/1 window matrices in float64 (below 2^53)."""
    r, c = _window_matrix(rows, x.shape[-2], x), _window_matrix(cols, x.shape[-1], x)
    sums = torch.round(r @ x.double() @ c.T).long()
    out = requantize(sums.reshape(-1, sums.shape[-2] * sums.shape[-1]), multiplier.reshape(-1), shift.reshape(-1),
                     out_dtype, axis=1)  # one multiplier and shift per output position, along axis 1
    return out.reshape(sums.shape)


def _taps(index: torch.Tensor, fraction: torch.Tensor, size: int, one: int, like: torch.Tensor):
    index, fraction = index.long().cpu(), fraction.long().cpu()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size or int(fraction.min()) < 0
                          or int(fraction.max()) >= one):
        raise ValueError(f"resize_bilinear: taps outside the input's [0, {size}) or fractions outside [0, {one})")
    return (index.to(like.device), (index + 1).clamp(max=size - 1).to(like.device),
            fraction.to(like.device), (one - fraction).to(like.device))


def resize_bilinear(x: torch.Tensor, *, row_index: torch.Tensor, row_fraction: torch.Tensor,
                    col_index: torch.Tensor, col_fraction: torch.Tensor, fraction_bits: int) -> torch.Tensor:
    """Bilinear resize with fixed-point tap weights of fraction_bits (k) bits, on the input's grid.

    Output row i reads rows row_index[i] and the next one (clamped) with weights (2^k - row_fraction[i],
    row_fraction[i]), the same along columns; the four-tap sum (|sum| <= 2^(15 + 2k): int32 for k <= 8) is shifted
    right by 2k with round half up."""
    one = 1 << fraction_bits
    r0, r1, fr, gr = _taps(row_index, row_fraction, x.shape[-2], one, x)
    c0, c1, fc, gc = _taps(col_index, col_fraction, x.shape[-1], one, x)
    q = x.long()
    rows = q.index_select(-2, r0) * gr.view(-1, 1) + q.index_select(-2, r1) * fr.view(-1, 1)
    acc = rows.index_select(-1, c0) * gc + rows.index_select(-1, c1) * fc
    info = torch.iinfo(x.dtype)
    return shift_right_round(acc, 2 * fraction_bits).clamp(info.min, info.max).to(x.dtype)


def pad(x: torch.Tensor, *, pads: Sequence[int], value: int) -> torch.Tensor:
    """Constant padding as F.pad (last dim first; negative pads crop) with an integer `value` on x's grid.

    The value is saturated to x's dtype."""
    info = torch.iinfo(x.dtype)
    return F.pad(x, list(pads), mode="constant", value=min(max(int(value), info.min), info.max))


KERNELS.update({f.__name__: f for f in (window_mean, resize_bilinear, pad)})


from hat.integer.norm_kernels import layer_norm  # noqa: E402  (LayerNorm / GroupNorm, issue 16)

KERNELS[layer_norm.__name__] = layer_norm
