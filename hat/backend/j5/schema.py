"""The parameter schema of the integer program: what each node parameter of each op may be, checked at load.

Types come from each kernel's signature (hat.integer.kernels: its keyword-only parameters and their hints: int,
float, bool, str, torch.Tensor, Sequence[int], Optional[...]); ranges and choices from the march's profile (the
checker's numbers) and from the kernels' own tables (accumulation modes, layout methods). `op_schema(march)[op]`
maps each parameter to a Rule; `check_params` raises ParamError naming the parameter, the value found and what was
expected. Every op of KERNELS has an entry and every parameter a bounded rule (tests/backend/test_irfile.py asserts
both), so a new kernel cannot skip validation. What the schema does not decide (does a shape fit the op) the
loader's dry run on meta tensors does, with `schema_relations.check_inputs` for what a meta run cannot see.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from hat.integer.kernels import KERNELS, LAYOUT_METHODS
from hat.integer.profile import QRANGES, TORCH_DTYPES, Profile, get_profile
from hat.backend.j5.program import TENSOR_REF
from hat.backend.j5.schema_relations import relations

MAX_RANK = 8  # dims of a program's tensors (hat's ops use at most 5)
INT64_ROOM = 2 ** 62  # an integer constant the kernels add in int64 stays below this: the sum cannot overflow
_POSITIVE = float.fromhex("0x1p-149")  # the smallest positive float32: scales are > 0
_FLOAT_MAX = torch.finfo(torch.float64).max
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64)
_FLOATS = (torch.float32, torch.float64)


class ParamError(ValueError):
    """A node parameter outside its rule; the loader adds the node and the file."""


@dataclass(frozen=True)
class Rule:
    """What one parameter may be. kind: int | float | bool | str | tensor (a {"$tensor": name} reference) | sizes
    (an int, or a list of `lengths` ints: one per spatial dim) | floats (the same with numbers) | ints (a list of
    ints, one per node input when `per_input`) | layout_args | layout_kwargs | index. Numbers, and a tensor's
    values, lie in [low, high] (and in `choices` when given)."""

    kind: Optional[str] = None
    low: Optional[float] = None
    high: Optional[float] = None
    choices: tuple = ()
    optional: bool = False  # null allowed
    lengths: tuple[int, ...] = (1, 2)
    per_input: bool = False
    dtypes: tuple[torch.dtype, ...] = ()  # tensor: the stored dtypes the op takes
    by_value: bool = False  # tensor: the kernel reads its values (requantize's multipliers and shifts)

    @property
    def bounded(self) -> bool:
        """Every value it accepts is known in type and range (what the coverage test asserts)."""
        if self.kind in ("bool", "index", "layout_args", "layout_kwargs"):
            return True
        if self.kind == "str":
            return bool(self.choices)
        if self.kind == "tensor":
            return bool(self.dtypes)
        return self.kind is not None and (bool(self.choices) or (self.low is not None and self.high is not None))


# --- the schema: types from the kernels' signatures, ranges from the profile --------------------------------------
_HINT_KINDS = {int: "int", float: "float", bool: "bool", str: "str", torch.Tensor: "tensor"}


def _derived(kernel: Callable) -> dict[str, Rule]:
    """A Rule per keyword-only parameter, typed from the hint; kind None where the hint says nothing usable."""
    hints = typing.get_type_hints(kernel)
    rules = {}
    for name, parameter in inspect.signature(kernel).parameters.items():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        hint = hints.get(name)
        args = typing.get_args(hint)
        optional = parameter.default is None or (typing.get_origin(hint) is typing.Union and type(None) in args)
        if optional and args:
            hint = next(a for a in args if a is not type(None))
        kind = _HINT_KINDS.get(hint)
        if typing.get_origin(hint) is collections.abc.Sequence and typing.get_args(hint) == (int,):
            kind = "ints"
        rules[name] = Rule(kind, optional=optional)
    return rules


def _ranges(march: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Per op, per parameter: what the signature does not say (ranges, choices, dtypes, kinds of untyped ones)."""
    p = get_profile(march)
    conv, tensor, grid = p.conv, p.tensor, p.grid_sample
    acc_low, acc_high = p.qrange(p.accumulator_dtype)
    span = max(high - low for low, high in map(p.qrange, p.activation_dtypes))  # a same-grid step or bound
    multiplier, shift = dict(low=-p.multiplier_max, high=p.multiplier_max), dict(low=0, high=p.max_shift)
    requantized = {"multiplier": multiplier, "shift": shift, "out_dtype": dict(choices=tuple(QRANGES))}
    scale = dict(dtypes=_FLOATS, low=_POSITIVE, high=_FLOAT_MAX)
    dim = dict(low=-MAX_RANK, high=MAX_RANK - 1)
    window, pad = dict(kind="sizes", low=1, high=tensor.max_hwc), dict(kind="sizes", low=0, high=tensor.max_hwc)
    add_shift = dict(low=0, high=max(p.add_max_shift.values()))
    weighted = {"weight": dict(dtypes=(TORCH_DTYPES[p.weight_dtype],)),
                "bias": dict(dtypes=_INTS, low=acc_low, high=acc_high),
                "multiplier": dict(multiplier, dtypes=_INTS, by_value=True),
                "shift": dict(shift, dtypes=_INTS, by_value=True),
                "acc_max": dict(dtypes=_INTS, low=acc_low, high=acc_high),
                "out_max": dict(low=0, high=INT64_ROOM), "out_dtype": dict(choices=tuple(QRANGES))}
    layout_ints = dict(low=-MAX_RANK, high=tensor.max_bytes)
    return {
        "quantize": {"scale": scale, "dtype": dict(choices=p.activation_dtypes)},
        "dequantize": {"scale": scale, "axis": dim},
        "conv2d": {**weighted, "stride": dict(kind="sizes", low=1, high=conv.max_stride),
                   "padding": dict(kind="sizes", low=0, high=conv.max_padding),
                   "dilation": dict(kind="sizes", low=1, high=conv.max_dilation),
                   "groups": dict(low=1, high=conv.max_in_channels)},
        "linear": weighted,
        "sum_partials": {"axis": dim, **{k: weighted[k] for k in ("multiplier", "shift", "acc_max", "out_max",
                                                                  "out_dtype")}},
        "add": {**requantized, "x_shift": add_shift, "x_sign": dict(choices=(-1, 1)), "y_multiplier": multiplier},
        "mul": requantized,
        "matmul": {**requantized, "out_dtype": dict(choices=p.activation_dtypes)},
        "expand_batch": {},
        "add_scalar": {**requantized, "x_shift": add_shift, "constant": dict(low=-INT64_ROOM, high=INT64_ROOM)},
        "mul_scalar": {**requantized, "sign": dict(choices=(-1, 1))},
        "cat": {"dim": dim, "multipliers": dict(multiplier, per_input=True), "shifts": dict(shift, per_input=True),
                "out_dtype": dict(choices=tuple(QRANGES))},
        "identity": {},
        "clip": {"low": dict(low=-span, high=span), "high": dict(low=-span, high=span)},
        "add_steps": {"steps": dict(low=-span, high=span)},
        "max_pool2d": {"kernel_size": window, "stride": window, "padding": pad, "dilation": window},
        "avg_pool2d": {"kernel_size": window, "stride": window, "padding": pad, **requantized},
        "global_avg_pool": requantized,
        "mean": {**requantized, "dims": dict(kind="ints", low=1, high=MAX_RANK - 1)},
        "extremum": {"multipliers": dict(multiplier, per_input=True), "shifts": dict(shift, per_input=True),
                     "out_dtype": dict(choices=tuple(QRANGES))},
        "prelu": {"pos_multiplier": multiplier, "pos_shift": shift,
                  "neg_multiplier": dict(multiplier, dtypes=_INTS, by_value=True),
                  "neg_shift": dict(shift, dtypes=_INTS, by_value=True), "channel_axis": dim,
                  "out_dtype": dict(choices=p.activation_dtypes)},
        "resize_nearest": {"size": dict(window, optional=True),
                           "scale_factor": dict(kind="floats", low=_POSITIVE, high=tensor.max_hwc, optional=True)},
        "layout": {"method": dict(choices=LAYOUT_METHODS), "args": dict(kind="layout_args", **layout_ints),
                   "kwargs": dict(kind="layout_kwargs", **layout_ints)},
        "index": {"items": dict(kind="index", low=-tensor.max_bytes, high=tensor.max_bytes)},
        "concat": {"dim": dim},
        "window_mean": {"rows": dict(dtypes=_INTS, low=0, high=tensor.max_hwc, by_value=True),
                        "cols": dict(dtypes=_INTS, low=0, high=tensor.max_hwc, by_value=True),
                        "multiplier": dict(multiplier, dtypes=_INTS, by_value=True),
                        "shift": dict(shift, dtypes=_INTS, by_value=True),
                        "out_dtype": dict(choices=p.activation_dtypes)},
        "resize_bilinear": {**{f"{axis}_index": dict(dtypes=_INTS, low=0, high=tensor.max_hwc - 1, by_value=True)
                               for axis in ("row", "col")},
                            **{f"{axis}_fraction": dict(dtypes=_INTS, low=0, high=2 ** grid.max_coord_shift - 1,
                                                        by_value=True) for axis in ("row", "col")},
                            "fraction_bits": dict(low=0, high=grid.max_coord_shift)},
        "pad": {"pads": dict(low=-tensor.max_hwc, high=tensor.max_hwc),
                "value": dict(low=min(p.qrange(d)[0] for d in p.activation_dtypes),
                              high=max(p.qrange(d)[1] for d in p.activation_dtypes))},
        "lookup": {"table": dict(dtypes=_INTS, low=-2**31, high=2**31 - 1), "out_dtype": dict(choices=tuple(QRANGES))},
        "segment_lookup": _segmented_ranges(p),
        "softmax_lut": _softmax_ranges(p),
        "layer_norm": _norm_ranges(p),
        "grid_sample": {"grid_scale": scale, "coord_shift": dict(low=0, high=grid.max_coord_shift),
                        "mode": dict(choices=grid.modes), "padding_mode": dict(choices=grid.padding_modes)},
    }


def _segmented_ranges(p: Profile) -> dict[str, dict[str, Any]]:
    """segment_lookup's parameters: dividing points on the widest input grid, int16 entries on the internal grid,
    int16 multipliers and shifts as in requantization, line offsets in the accumulator."""
    widest = max(p.activation_dtypes, key=lambda dtype: p.qrange(dtype)[1])
    small = (TORCH_DTYPES[widest],)
    (in_low, in_high), (lut_low, lut_high) = p.qrange(widest), p.qrange(p.lut_internal_dtype)
    shift = dict(dtypes=small, low=0, high=p.max_shift)
    return {"points": dict(dtypes=small, low=in_low, high=in_high),
            "tables": dict(dtypes=(TORCH_DTYPES[p.lut_internal_dtype],), low=lut_low, high=lut_high),
            "index_multiplier": dict(dtypes=small, low=1, high=p.multiplier_max), "index_shift": shift,
            "index_bits": dict(dtypes=small, low=0, high=p.lut_max_index_bits),
            "line_multiplier": dict(dtypes=small, low=-p.multiplier_max, high=p.multiplier_max), "line_shift": shift,
            "line_offset": dict(dtypes=(TORCH_DTYPES[p.accumulator_dtype],), low=p.qrange(p.accumulator_dtype)[0],
                                high=p.qrange(p.accumulator_dtype)[1]),
            "internal_dtype": dict(choices=(p.lut_internal_dtype,)),
            "out_shift": dict(low=0, high=max(map(p.lut_output_shift, p.activation_dtypes))),
            "out_dtype": dict(choices=p.activation_dtypes)}


def _softmax_ranges(p: Profile) -> dict[str, dict[str, Any]]:
    """softmax_lut: the exp stage as lookup's / segment_lookup's (entries on the internal grid, >= 0), an int32
    mantissa table, multiplier and shifts as in requantization, int32 log constants (lut.softmax_params)."""
    segmented = {k: v for k, v in _segmented_ranges(p).items()
                 if k not in ("internal_dtype", "out_shift", "out_dtype")}
    internal, int32_max = p.lut_internal_dtype, p.qrange("qint32")[1]
    return {**segmented, "dim": dict(low=1, high=MAX_RANK - 1), "d_shift": dict(low=0, high=16),
            "internal_dtype": dict(choices=(internal,)),
            "exp_table": dict(dtypes=(TORCH_DTYPES[internal],), low=0, high=p.qrange(internal)[1]),
            "mantissa_table": dict(dtypes=(torch.int32,), low=0, high=int32_max),
            "fraction_bits": dict(low=0, high=16), "recip_shift": dict(low=-p.max_shift, high=p.max_shift),
            "multiplier": dict(low=1, high=p.multiplier_max), "shift": dict(low=0, high=p.max_shift),
            "ln2": dict(low=0, high=int32_max), "log_offset": dict(low=0, high=int32_max),
            "out_dtype": dict(choices=p.activation_dtypes)}


def _norm_ranges(p: Profile) -> dict[str, dict[str, Any]]:
    """layer_norm (hat/integer/norm_tables.py): group layout, the mean's fraction bits, eps in int64, an int32
    rsqrt table of 16-bit entries, the affine as requantization's int16 multipliers and shifts and an int32 bias."""
    acc_low, acc_high = p.qrange(p.accumulator_dtype)
    return {"start_dim": dict(low=1, high=MAX_RANK - 1), "groups": dict(low=1, high=p.tensor.max_hwc),
            "mean_bits": dict(low=0, high=16), "eps": dict(low=0, high=INT64_ROOM),
            "rsqrt_table": dict(dtypes=(torch.int32,), low=0, high=2 ** 16),
            "fraction_bits": dict(low=0, high=16), "rsqrt_bits": dict(low=0, high=16), "y_bits": dict(low=0, high=24),
            "multiplier": dict(dtypes=_INTS, low=-p.multiplier_max, high=p.multiplier_max),
            "shift": dict(dtypes=_INTS, low=0, high=p.max_shift),
            "bias": dict(dtypes=_INTS, low=acc_low, high=acc_high),
            "out_dtype": dict(choices=p.activation_dtypes)}


@functools.lru_cache(maxsize=None)
def op_schema(march: str) -> dict[str, dict[str, Rule]]:
    """op -> parameter -> Rule, for every op of KERNELS (an op without ranges gets an empty entry: none taken)."""
    ranges = _ranges(march)
    schema = {}
    for op, kernel in KERNELS.items():
        derived = _derived(kernel)
        extra = ranges.get(op, {})
        schema[op] = {name: dataclasses.replace(derived.get(name, Rule()), **extra.get(name, {}))
                      for name in [*derived, *(n for n in extra if n not in derived)]}
    return schema


def unbounded(march: str = "bayes") -> list[str]:
    """'op.param' for each kernel parameter whose rule leaves its type or range open (must stay empty)."""
    schema = op_schema(march)
    missing = [f"{op} (no schema)" for op in KERNELS if op not in schema]
    return missing + [f"{op}.{name}" for op, rules in schema.items() for name, rule in rules.items()
                      if not rule.bounded or name not in _derived(KERNELS[op])]


# --- checking a node's parameters ---------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, float) and math.isfinite(v)) or _is_int(v)


def _within(rule: Rule, v: Any) -> bool:
    return ((rule.low is None or v >= rule.low) and (rule.high is None or v <= rule.high)
            and (not rule.choices or v in rule.choices))


def _int_ok(rule: Rule, v: Any) -> bool:
    return _is_int(v) and _within(rule, v)


def _float_ok(rule: Rule, v: Any) -> bool:
    return _is_number(v) and _within(rule, v)


def _per_dim(item_ok: Callable[[Rule, Any], bool]) -> Callable[[Rule, Any, dict], bool]:
    return lambda rule, v, ctx: item_ok(rule, v) or (
        isinstance(v, list) and len(v) in rule.lengths and all(item_ok(rule, i) for i in v))


def _ints_ok(rule: Rule, v: Any, ctx: dict) -> bool:
    if not isinstance(v, list) or len(v) != (ctx["inputs"] if rule.per_input else len(v)) or len(v) > 1024:
        return False
    return all(_int_ok(rule, i) for i in v)


def _dims_ok(rule: Rule, v: Any) -> bool:
    """An int, or a list of at most MAX_RANK ints (a shape, a permutation)."""
    return _int_ok(rule, v) or (isinstance(v, list) and len(v) <= MAX_RANK and all(_int_ok(rule, i) for i in v))


def _index_item_ok(rule: Rule, v: Any) -> bool:
    if isinstance(v, list):
        return len(v) == 3 and all(i is None or _int_ok(rule, i) for i in v)
    return v is None or v == "..." or _int_ok(rule, v)


_CHECKS: dict[str, Callable[[Rule, Any, dict], bool]] = {
    "int": lambda rule, v, ctx: _int_ok(rule, v),
    "float": lambda rule, v, ctx: _float_ok(rule, v),
    "bool": lambda rule, v, ctx: isinstance(v, bool),
    "str": lambda rule, v, ctx: isinstance(v, str) and v in rule.choices,
    "sizes": _per_dim(_int_ok),
    "floats": _per_dim(_float_ok),
    "ints": _ints_ok,
    "layout_args": lambda rule, v, ctx: isinstance(v, list) and len(v) <= MAX_RANK and all(
        _dims_ok(rule, i) for i in v),
    "layout_kwargs": lambda rule, v, ctx: isinstance(v, dict) and len(v) <= MAX_RANK and all(
        isinstance(k, str) and k != TENSOR_REF and _dims_ok(rule, i) for k, i in v.items()),
    "index": lambda rule, v, ctx: isinstance(v, list) and len(v) <= MAX_RANK and all(
        _index_item_ok(rule, i) for i in v),
}
_EXPECTED = {
    "int": "an int", "float": "a number", "bool": "true or false", "str": "a string",
    "sizes": "an int or a list of {lengths} ints", "floats": "a number or a list of {lengths} numbers",
    "ints": "a list of ints", "layout_args": "a list of ints or int lists",
    "layout_kwargs": "an object of ints or int lists", "index": "a list of ints, null, \"...\" or [start, stop, step]",
    "tensor": "a tensor reference {{\"$tensor\": name}}",
}


def describe(rule: Rule) -> str:
    """What the rule accepts, in words."""
    lengths = "-".join(map(str, sorted({min(rule.lengths), max(rule.lengths)})))
    words = _EXPECTED[rule.kind].format(lengths=lengths)
    if rule.kind == "tensor":
        words += f" to a tensor of dtype {' or '.join(str(d).replace('torch.', '') for d in rule.dtypes)}"
    if rule.choices:
        words = f"one of {', '.join(map(repr, rule.choices))}"
    elif rule.low is not None and rule.high is not None:
        low = "(0" if rule.low == _POSITIVE else f"[{rule.low}"
        words += ", positive" if rule.high == _FLOAT_MAX else f" in {low}, {rule.high}]"
    if rule.per_input:
        words += ", one per input of the node"
    return words + (", or null" if rule.optional else "")


def _tensor_problem(rule: Rule, v: Any, tensors: dict[str, torch.Tensor]) -> Optional[str]:
    if not (isinstance(v, dict) and list(v) == [TENSOR_REF] and isinstance(v[TENSOR_REF], str)):
        return f"is {_show(v)}, expected {describe(rule)}"
    name = v[TENSOR_REF]
    if name not in tensors:
        return f"refers to a missing tensor {v!r}"
    t = tensors[name]
    if t.dtype not in rule.dtypes:
        return f"refers to tensor '{name}' of dtype {str(t.dtype).replace('torch.', '')}; expected {describe(rule)}"
    if t.numel() and rule.low is not None and (
            (t.is_floating_point() and not bool(torch.isfinite(t).all())) or float(t.min()) < rule.low
            or float(t.max()) > rule.high):
        return (f"refers to tensor '{name}' with values in [{float(t.min()):g}, {float(t.max()):g}]; expected "
                f"{describe(rule)}")
    return None


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_params(march: str, op: str, params: dict[str, Any], tensors: dict[str, torch.Tensor], inputs: int) -> None:
    """ParamError for the first parameter of the node outside its rule, or for parameters that do not fit
    each other (schema_relations)."""
    rules = op_schema(march).get(op)
    if rules is None:
        raise ParamError(f"op '{op}' has no parameter schema")
    for name, value in params.items():
        rule = rules.get(name)
        if rule is None:
            raise ParamError(f"parameter '{name}' is not one that {op} takes ({', '.join(sorted(rules)) or 'none'})")
        if value is None and rule.optional:
            continue
        if rule.kind == "tensor":
            problem = _tensor_problem(rule, value, tensors)
        else:
            ok = value is not None and _CHECKS[rule.kind](rule, value, {"inputs": inputs})
            problem = None if ok else f"is {_show(value)}, expected {describe(rule)}"
        if problem:
            raise ParamError(f"parameter '{name}' {problem}")
    relation = relations(march).get(op)
    if relation is not None:
        resolved = {k: tensors[v[TENSOR_REF]] if rules[k].kind == "tensor" and v is not None else v
                    for k, v in params.items()}
        problem = relation(resolved)
        if problem:
            raise ParamError(problem)


def by_value(march: str, op: str, name: str) -> bool:
    """Whether the kernel reads the values of tensor parameter `name` (the dry run then passes the real tensor)."""
    rule = op_schema(march)[op].get(name)
    return rule is not None and rule.by_value
