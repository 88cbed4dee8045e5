"""What a program node's parameters must agree on (shapes of weight and bias, table sizes, the parameters of one mode),
and what a dry run on meta tensors cannot see about its inputs; part of the .hir validation (schema.check_params,
irfile's dry run)."""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from hat.integer.profile import Profile, get_profile


def _weighted(rank: int) -> Callable[[dict], Optional[str]]:
    def check(params: dict) -> Optional[str]:
        weight, bias = params["weight"], params["bias"]
        if weight.dim() != rank:
            return f"parameter 'weight' has shape {list(weight.shape)}; expected {rank} dims"
        out = weight.shape[0]
        multiplier, shift, acc_max = params.get("multiplier"), params.get("shift"), params.get("acc_max")
        if bias.numel() != out:
            return f"parameter 'bias' has {bias.numel()} values for {out} output channels"
        if (multiplier is None) != (shift is None):
            return "parameters 'multiplier' and 'shift' must both be given (requantized output) or both be null"
        if multiplier is not None and not (multiplier.numel() == shift.numel() and multiplier.numel() in (1, out)):
            return (f"parameters 'multiplier' and 'shift' have {multiplier.numel()} and {shift.numel()} values; "
                    f"expected 1 or {out} (one per output channel) each")
        if acc_max is not None and acc_max.numel() != out:
            return f"parameter 'acc_max' has {acc_max.numel()} values for {out} output channels"
        return None

    return check


def _sum_partials(params: dict) -> Optional[str]:
    """sum_partials: the requantization of the layer it completes, per tensor or one per output channel."""
    multiplier, shift, acc_max = params.get("multiplier"), params.get("shift"), params.get("acc_max")
    if (multiplier is None) != (shift is None):
        return "parameters 'multiplier' and 'shift' must both be given (requantized output) or both be null"
    if multiplier is not None and multiplier.numel() != shift.numel():
        return f"parameters 'multiplier' and 'shift' have {multiplier.numel()} and {shift.numel()} values"
    if acc_max is not None and multiplier is not None:
        return "parameter 'acc_max' (relu6 on an int32 output) goes with a null multiplier"
    return None


def _prelu(params: dict) -> Optional[str]:
    """prelu: one negative-side multiplier and shift per slope (1, or one per channel)."""
    multiplier, shift = params["neg_multiplier"], params["neg_shift"]
    if multiplier.dim() != 1 or shift.dim() != 1 or multiplier.numel() != shift.numel() or not multiplier.numel():
        return (f"parameters 'neg_multiplier' and 'neg_shift' have shapes {list(multiplier.shape)} and "
                f"{list(shift.shape)}; expected one 1-d list each, of equal length (1, or one per channel)")
    return None


def _exact_table(params: dict) -> Optional[str]:
    table = params["table"]
    if list(table.shape) != [256]:
        return f"parameter 'table' has shape {list(table.shape)}; an exact table of an int8 input has 256 entries"
    return None


def _segmented(p: Profile) -> Callable[[dict], Optional[str]]:
    """segment_lookup: the profile's table count and size, rising dividing points, and each table's index map
    ending on its last entry (within half an entry) at the next point."""
    count, entries = p.lut_tables, p.lut_table_entries
    shapes = {"points": [count + 1], "tables": [count, entries], "index_multiplier": [count], "index_shift": [count],
              "index_bits": [count], "line_multiplier": [2], "line_shift": [2], "line_offset": [2]}

    def check(params: dict) -> Optional[str]:
        for name, shape in shapes.items():
            if list(params[name].shape) != shape:
                return f"parameter '{name}' has shape {list(params[name].shape)}; a segmented table takes {shape}"
        widths = params["points"].long().diff()
        if bool((widths <= 0).any()):
            return f"parameter 'points' is {params['points'].tolist()}; dividing points rise strictly"
        shift, bits = params["index_shift"].long(), params["index_bits"].long()
        end = torch.bitwise_right_shift(widths * params["index_multiplier"].long() + ((1 << shift) >> 1), shift)
        miss = (2 * (end - ((entries - 1) << bits)).abs() > (1 << bits)).nonzero().flatten().tolist()
        if miss:
            return (f"the index map of table {miss[0]} (index_multiplier, index_shift, index_bits) does not end on "
                    f"its last entry at the next dividing point")
        return None

    return check


def _softmax(p: Profile) -> Callable[[dict], Optional[str]]:
    """softmax_lut: one exp stage (an exact table, or every segmented tensor with segment_lookup's shapes), a
    mantissa table of 2^b + 1 entries, and the constants of its mode (softmax or log_softmax)."""
    segmented, names = _segmented(p), ("points", "tables", "index_multiplier", "index_shift", "index_bits",
                                       "line_multiplier", "line_shift", "line_offset")

    def check(params: dict) -> Optional[str]:
        given = [name for name in names if params.get(name) is not None]
        if (params.get("exp_table") is None) == (len(given) == 0) or 0 < len(given) < len(names):
            return "softmax_lut takes either 'exp_table' or all of the segmented exp tables (" + ", ".join(names) + ")"
        problem = segmented(params) if given else None
        if problem:
            return problem
        if params.get("exp_table") is not None and params["exp_table"].dim() != 1:
            return f"parameter 'exp_table' has shape {list(params['exp_table'].shape)}; expected one dim"
        table = params.get("mantissa_table")
        entries = -1 if table is None or table.dim() != 1 else table.numel() - 1
        if entries < 1 or entries & (entries - 1) or entries > 2 ** 16:
            return f"parameter 'mantissa_table' has shape {None if table is None else list(table.shape)}; " \
                   f"expected [2^b + 1], b in [0, 16]"
        mode = ("multiplier", "shift", "ln2", "log_offset") if params.get("log") else ("recip_shift",)
        missing = [name for name in mode if params.get(name) is None]
        if missing:
            return f"{'log_softmax' if params.get('log') else 'softmax'} needs parameter(s) {', '.join(missing)}"
        return None

    return check


def _window_mean(params: dict) -> Optional[str]:
    """window_mean: [out_h, 2] and [out_w, 2] windows [start, end), one multiplier and shift per output position."""
    rows, cols, multiplier, shift = params["rows"], params["cols"], params["multiplier"], params["shift"]
    if rows.dim() != 2 or rows.shape[1] != 2 or cols.dim() != 2 or cols.shape[1] != 2:
        return (f"parameters 'rows' and 'cols' have shapes {list(rows.shape)} and {list(cols.shape)}; expected "
                f"[out_h, 2] and [out_w, 2] (a window [start, end) per output row and column)")
    if bool((rows[:, 0] > rows[:, 1]).any()) or bool((cols[:, 0] > cols[:, 1]).any()):
        return "parameters 'rows' and 'cols' hold a window that ends before it starts"
    positions = [rows.shape[0], cols.shape[0]]
    if list(multiplier.shape) != positions or list(shift.shape) != positions:
        return (f"parameters 'multiplier' and 'shift' have shapes {list(multiplier.shape)} and {list(shift.shape)}; "
                f"expected {positions} (one per output position)")
    return None


def _resize_bilinear(params: dict) -> Optional[str]:
    """resize_bilinear: one tap index and one fraction (below 2^fraction_bits) per output row and per column."""
    for axis in ("row", "col"):
        index, fraction = params[f"{axis}_index"], params[f"{axis}_fraction"]
        if index.dim() != 1 or list(index.shape) != list(fraction.shape):
            return (f"parameters '{axis}_index' and '{axis}_fraction' have shapes {list(index.shape)} and "
                    f"{list(fraction.shape)}; expected one 1-d list each, of equal length")
        if fraction.numel() and int(fraction.max()) >= 1 << params["fraction_bits"]:
            return f"parameter '{axis}_fraction' holds {int(fraction.max())}, not below 2^fraction_bits"
    return None


def _pad(params: dict) -> Optional[str]:
    pads = params["pads"]
    if len(pads) % 2 or not 0 < len(pads) <= 16:
        return f"parameter 'pads' is {pads}; expected a (before, after) pair per padded dim, last dim first"
    return None


def _layer_norm(params: dict) -> Optional[str]:
    """layer_norm: a rsqrt table of 3 * 2^b + 1 entries, and multiplier, shift and bias of one shape."""
    table = params["rsqrt_table"]
    step = (table.numel() - 1) // 3 if table.dim() == 1 else 0
    if step < 1 or table.numel() != 3 * step + 1 or step & (step - 1) or step > 2 ** 16:
        return f"parameter 'rsqrt_table' has shape {list(table.shape)}; expected [3 * 2^b + 1], b in [0, 16]"
    shapes = [list(params[name].shape) for name in ("multiplier", "shift", "bias")]
    if shapes[0] != shapes[1] or shapes[0] != shapes[2] or params["multiplier"].dim() > 8:
        return (f"parameters 'multiplier', 'shift' and 'bias' have shapes {shapes[0]}, {shapes[1]} and {shapes[2]}; "
                f"expected one shape (the affine's)")
    return None


_GRID_RELATIONS = {"layer_norm": _layer_norm, "window_mean": _window_mean, "resize_bilinear": _resize_bilinear,
                   "pad": _pad}


@functools.lru_cache(maxsize=None)
def relations(march: str) -> dict[str, Callable[[dict], Optional[str]]]:
    """Per op: a check of its parameters against each other on `march` (a problem text, or None)."""
    p = get_profile(march)
    return {"conv2d": _weighted(4), "linear": _weighted(2), "sum_partials": _sum_partials, "lookup": _exact_table,
            "prelu": _prelu, "segment_lookup": _segmented(p), "softmax_lut": _softmax(p), **_GRID_RELATIONS}


def _grid_sample_inputs(x: torch.Tensor, grid: torch.Tensor) -> Optional[str]:
    """What the compiled grid_sample kernel checks (hat/csrc/checks.h) that its meta reference does not."""
    if x.dim() != 4 or x.dtype != torch.int8:
        return f"input is {str(x.dtype).replace('torch.', '')} {list(x.shape)}; grid_sample takes int8 [N, C, H, W]"
    if grid.dim() != 4 or grid.shape[3] != 2 or grid.shape[0] != x.shape[0]:
        return f"grid is {list(grid.shape)}; grid_sample takes [N, H_out, W_out, 2] with the input's N"
    return None


def _int8_input(x: torch.Tensor) -> Optional[str]:
    return None if x.dtype == torch.int8 else f"input is {str(x.dtype).replace('torch.', '')}; this op takes int8"


def _activation_input(x: torch.Tensor) -> Optional[str]:
    return None if x.dtype in (torch.int8, torch.int16) else (
        f"input is {str(x.dtype).replace('torch.', '')}; this op takes int8 or int16")


def _two_activations(x: torch.Tensor, y: torch.Tensor) -> Optional[str]:
    return _activation_input(x) or _activation_input(y)


def _partial_sums(*parts: torch.Tensor) -> Optional[str]:
    """sum_partials: two or more int32 accumulators of one shape (no broadcasting)."""
    if len(parts) < 2 or any(p.dtype != torch.int32 or p.shape != parts[0].shape for p in parts):
        found = ", ".join(f"{str(p.dtype).replace('torch.', '')} {list(p.shape)}" for p in parts)
        return f"inputs are {found}; sum_partials takes two or more int32 tensors of one shape"
    return None


def _one_sample(x: torch.Tensor, like: torch.Tensor) -> Optional[str]:
    """expand_batch: a batch-1 tensor repeated to the batch of an input with a batch dim."""
    if x.dim() < 1 or x.shape[0] != 1 or like.dim() < 1:
        return f"inputs are {list(x.shape)} and {list(like.shape)}; expand_batch takes [1, ...] and a tensor [N, ...]"
    return None


INPUT_CHECKS: dict[str, Callable[..., Optional[str]]] = {
    "matmul": _two_activations, "expand_batch": _one_sample, "sum_partials": _partial_sums,
    "grid_sample": _grid_sample_inputs, "lookup": _int8_input, "softmax_lut": _activation_input,
    "segment_lookup": _activation_input, "prelu": _activation_input}


INPUT_CHECKS.update({op: _activation_input for op in ("window_mean", "resize_bilinear", "pad", "layer_norm")})


def check_inputs(op: str, inputs: list[torch.Tensor]) -> Optional[str]:
    """A problem with the node's input shapes or dtypes that the dry run on meta tensors would miss, or None."""
    check = INPUT_CHECKS.get(op)
    return check(*inputs) if check is not None else None
