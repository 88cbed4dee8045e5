"""A symbolic tracer that knows the example's shapes: branches on `x.shape`, `x.size()`, `x.dim()`, `x.dtype` or
`x.device` (timm's `if x.shape[1] != self.dim:`, `if x.ndim == 4:`) are decided by the example inputs, while the
graph stays symbolic (a reshape to `x.shape[0]` still follows the batch). Branches on tensor VALUES still fail: a
compiled program has one path (FAQ 2.4 Q10).

Every traced node also gets its value on the example (one ordinary forward alongside the trace); a node is
"shape-derived" when it reads metadata or computes only from such nodes and constants.
"""
from __future__ import annotations

import operator
from typing import Any, Iterator, Sequence

import torch
from torch import fx, nn

_METADATA_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}
_METADATA_METHODS = {"size", "dim", "numel", "get_device", "is_contiguous", "is_floating_point", "element_size",
                     "nelement", "stride", "new_zeros", "new_ones", "new_full", "new_empty"}  # new_*: a new tensor
_UNKNOWN = object()
_OPAQUE_PACKAGES = ("torch.", "torchvision.ops")


class ShapeBranchError(fx.proxy.TraceError):
    """A branch the example cannot decide: the message says which value and why."""


class _ShapeProxy(fx.Proxy):
    """A proxy that turns into a plain int where Python needs one (range(x.shape[1]), [0] * x.dim())."""

    def __index__(self) -> int:
        return int(self.tracer.concrete(self, "as an int"))

    __int__ = __index__

    def __setitem__(self, key: Any, value: Any) -> None:
        """mask[h0:h1, w0:w1] = count (Swin's attention mask): recorded in place, as the code ran it."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class ShapeTracer(fx.Tracer):
    def __init__(self, example_inputs: Sequence[Any]):
        super().__init__()
        self.record_stack_traces = True  # so messages can name the user's line of a rewritten call
        self.example_inputs = list(example_inputs)
        self.values: dict[fx.Node, Any] = {}
        self.shape_derived: set[fx.Node] = set()
        self.placeholders = 0
        self.evaluating = False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self)

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        """Functions a model's code marks with torch.fx.wrap (torchvision's shifted_window_attention) are traced
        through: an opaque call would meet QTensors inside. torch's and torchvision.ops' own stay calls."""
        from torch.fx import _symbolic_trace

        wrapped = getattr(_symbolic_trace, "_wrapped_fns_to_patch", {})
        saved = dict(wrapped)
        for key, namespace in saved.items():
            if not str(namespace.get("__name__", "")).startswith(_OPAQUE_PACKAGES):
                del wrapped[key]
        try:
            return super().trace(root, concrete_args)
        finally:
            wrapped.clear()
            wrapped.update(saved)

    # while a node's example value is computed, module calls and attributes are the real ones (no tracing)
    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        return forward(*args, **kwargs) if self.evaluating else super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict) -> Any:
        return attr_val if self.evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, *rest: Any, **options: Any) -> fx.Proxy:
        value, derived = self._evaluate(kind, target, args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
        self.values[proxy.node] = value
        if derived:
            self.shape_derived.add(proxy.node)
        return proxy

    # --- Python asks for a concrete value ----------------------------------------------------------------------------
    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.concrete(obj, "in an if/while/assert"))

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = self.concrete(obj, "in a for loop")
        return iter([obj[i] for i in range(len(value))])

    def concrete(self, obj: fx.Proxy, use: str) -> Any:
        node = obj.node
        if node not in self.shape_derived:
            raise fx.proxy.TraceError(f"'{node.name}' is computed from tensor values and used {use}")
        value = self.values.get(node, _UNKNOWN)
        if value is _UNKNOWN:
            raise ShapeBranchError(f"'{node.name}' depends only on shapes but could not be computed on the example "
                                   f"inputs, and it is used {use}: check that example_inputs are what forward takes")
        return value

    # --- the example's values ----------------------------------------------------------------------------------------
    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict) -> tuple[Any, bool]:
        """(value on the example or _UNKNOWN, shape-derived?) of the node about to be made."""
        if kind == "placeholder":
            index, self.placeholders = self.placeholders, self.placeholders + 1
            if index >= len(self.example_inputs):
                return _UNKNOWN, False
            example = self.example_inputs[index]
            return (example.detach().clone() if isinstance(example, torch.Tensor) else example), False
        derived = kind in ("call_function", "call_method") and (
            _reads_metadata(kind, target, args)
            or all(p.node in self.shape_derived for p in _proxies((args, kwargs))))
        try:
            arg_values, kwarg_values = fx.node.map_aggregate((args, kwargs), self._value_of)
            self.evaluating = True
            with torch.no_grad():
                return _run(self.root, kind, target, arg_values, kwarg_values), derived
        except Exception:  # noqa: BLE001  (an op the example cannot run only loses its value, not the trace)
            return _UNKNOWN, derived
        finally:
            self.evaluating = False

    def _value_of(self, a: Any) -> Any:
        if isinstance(a, fx.Proxy):
            value = self.values.get(a.node, _UNKNOWN)
            if value is _UNKNOWN:
                raise LookupError(a.node.name)
            return value
        return a


def _proxies(tree: Any) -> list[fx.Proxy]:
    found: list[fx.Proxy] = []

    def visit(a: Any) -> Any:
        if isinstance(a, fx.Proxy):
            found.append(a)
        return a

    fx.node.map_aggregate(tree, visit)
    return found


def reads_metadata(node: fx.Node) -> bool:
    """x.shape, x.size(0), x.dim(), ...: a graph node that reads a tensor's metadata, not its values."""
    return node.op in ("call_function", "call_method") and _reads_metadata(node.op, node.target, node.args)


def _reads_metadata(kind: str, target: Any, args: tuple) -> bool:
    if kind == "call_method":
        return target in _METADATA_METHODS
    return target is getattr and len(args) == 2 and args[1] in _METADATA_ATTRIBUTES


def _run(root: nn.Module, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
    if kind == "call_function":
        return target(*args, **kwargs)
    if kind == "call_method":
        return getattr(args[0], target)(*args[1:], **kwargs)
    if kind == "call_module":
        return root.get_submodule(target)(*args, **kwargs)
    if kind == "get_attr":
        return operator.attrgetter(target)(root)
    raise LookupError(kind)
