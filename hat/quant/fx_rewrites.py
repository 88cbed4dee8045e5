"""prepare_qat_fx's graph rewrites: the calls of a traced plain torch model become the modules prepare_qat swaps.

torch.sigmoid(x), F.silu(x), x.exp(), x ** 2 -> ElementwiseOp (table ops); F.softmax / log_softmax -> SoftmaxOp;
a / b -> a * reciprocal(b); tensor-tensor add/sub/mul/cat/maximum/minimum/matmul and activation +- number ->
FloatFunctional calls (matmul calls, einsum, scaled_dot_product_attention and nn.MultiheadAttention first become
`a @ b`: fx_attention.py; calls on the model's parameters were made modules before fusion: fx_modules.py). Each
made module remembers the user's source line, so messages about it name that line.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx

from hat.quant import fx_tracer, optable
from hat.quant.fx_common import computed_from_input, from_source, is_tensor, replace_with_module, where
from hat.quant.elementwise import ElementwiseOp
from hat.quant.qtensor import QTensor, QuantizationError
from hat.quant.softmax import SoftmaxOp, checked_dim
from hat.quant.stubs import FloatFunctional, QuantStub


def _is_method(f: Any) -> bool:
    return getattr(torch.Tensor, getattr(f, "__name__", ""), None) is f


_BINARY = {operator.add: "add", operator.iadd: "add", torch.add: "add", operator.sub: "sub", operator.isub: "sub",
           torch.sub: "sub", operator.mul: "mul", operator.imul: "mul", torch.mul: "mul"}
_BINARY[operator.matmul] = "matmul"  # two activations (fx_attention makes torch.matmul, bmm, einsum, attention a @ b)
_EXTREMA = {torch.maximum: "maximum", torch.max: "maximum", torch.minimum: "minimum", torch.min: "minimum"}
_ELEMENTWISE_FUNCTIONS = {f: op for op in optable.OPS for f in op.functions if not _is_method(f)}
_ELEMENTWISE_FUNCTIONS[F.gelu] = optable.BY_NAME["gelu"]
_ELEMENTWISE_METHODS = {f.__name__: op for op in optable.OPS for f in op.functions if _is_method(f)}


def call_float_functional(module: FloatFunctional, method: str, *args):
    """The graph's way to call a FloatFunctional method (a graph node can only call a module's forward)."""
    return getattr(module, method)(*args)


def _elementwise_call(node: fx.Node) -> Optional[tuple[str, dict[str, Any]]]:
    """(table op name, arguments) when `node` calls a function or Tensor method of the op table on a tensor."""
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
        op = _ELEMENTWISE_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
        op = _ELEMENTWISE_METHODS[node.target]
    elif node.op in ("call_function", "call_method") and node.target in (operator.pow, torch.pow, "pow") \
            and len(node.args) == 2 and isinstance(node.args[1], (int, float)) and not node.kwargs:
        return "pow", {"exponent": float(node.args[1])}
    else:
        return None
    if not node.args or not is_tensor(node.args[0]):
        return None
    bound = _bind(node, op)
    if op.name == "gelu":
        return optable.gelu_entry(bound.pop("approximate", "none")).name, {}
    return op.name, {k: v for k, v in bound.items() if k in op.arguments}


def _bind(node: fx.Node, op: optable.Elementwise) -> dict[str, Any]:
    """The call's arguments after x, by name (positional ones named through the function's signature)."""
    rest, kwargs = node.args[1:], dict(node.kwargs)
    kwargs.pop("inplace", None)
    if not rest:
        return kwargs
    try:
        signature = inspect.signature(node.target if callable(node.target) else getattr(torch.Tensor, node.target))
        bound = signature.bind(*node.args, **kwargs).arguments
    except (TypeError, ValueError):
        raise QuantizationError(f"prepare_qat_fx: {op.name} called with positional arguments {rest} in "
                                f"{where(node)}; pass them by name") from None
    bound.pop(next(iter(bound)))  # x
    bound.pop("inplace", None)
    return bound


def _rewrite_elementwise(gm: fx.GraphModule) -> None:
    """torch.sigmoid(x), F.silu(x), x.exp(), x ** 2, F.gelu(x, approximate=...) ... -> ElementwiseOp modules, which
    prepare_qat gives an output fake quant (the table op needs an observed output scale)."""
    graph = gm.graph
    from_input = computed_from_input(graph)
    for node in list(graph.nodes):
        found = _elementwise_call(node) if node in from_input else None  # not shape arithmetic, not constants
        if found is None:
            continue
        name, arguments = found
        replace_with_module(gm, node, ElementwiseOp(name, **arguments), "lut", node.args[0])


_DIVISIONS = (operator.truediv, operator.itruediv, torch.div, torch.true_divide, torch.divide)
_DIVISION_METHODS = ("div", "true_divide", "divide")


def _rewrite_division(gm: fx.GraphModule) -> None:
    """a / b, torch.div(a, b), torch.true_divide(a, b), a.div(b) with a tensor b -> a * reciprocal(b): the
    reciprocal an ElementwiseOp("reciprocal") (a table op with an observed output scale), the product a tensor-tensor
    mul that _rewrite_tensor_arithmetic makes a FloatFunctional call (for a number a: reciprocal(b) * a, which the
    QTensor does on its grid). A denominator computed from the model's own tensors only keeps its reciprocal in
    float (the mul quantizes it). Division by a number needs no rewrite (QTensor.__truediv__);
    rounding_mode='floor'/'trunc' is refused."""
    graph = gm.graph
    from_input = computed_from_input(graph)
    for node in list(graph.nodes):
        if not ((node.op == "call_function" and node.target in _DIVISIONS)
                or (node.op == "call_method" and node.target in _DIVISION_METHODS)) or len(node.args) != 2:
            continue
        a, b = node.args
        if node not in from_input or not (is_tensor(a) or is_tensor(b)):
            continue  # constants only (float arithmetic, quantized where the model uses it) or shape arithmetic
        kwargs = dict(node.kwargs)
        rounding_mode = kwargs.pop("rounding_mode", None)
        if rounding_mode is not None:
            raise QuantizationError(f"prepare_qat_fx: division with rounding_mode={rounding_mode!r} in "
                                    f"{where(node)} is not supported: a quantized model divides by multiplying "
                                    f"with a reciprocal table and cannot floor or truncate the quotient; drop "
                                    f"rounding_mode, or compute it in float outside the quantized part")
        if kwargs:
            raise QuantizationError(f"prepare_qat_fx: division with {', '.join(kwargs)}=... in {where(node)} is "
                                    f"not supported; write a / b")
        if not is_tensor(b) or not (is_tensor(a) or isinstance(a, (int, float))):
            continue  # by a number: QTensor.__truediv__ keeps the grid
        with graph.inserting_before(node):
            if b in from_input:
                target = f"{node.name}_reciprocal"
                gm.add_submodule(target, from_source(ElementwiseOp("reciprocal"), node))
                reciprocal = graph.call_module(target, (b,))
            else:
                reciprocal = graph.call_function(torch.reciprocal, (b,))
            reciprocal.meta = dict(b.meta)
            product = graph.call_function(operator.mul, (a, reciprocal) if isinstance(a, fx.Node) else (reciprocal, a))
        product.meta = node.meta
        node.replace_all_uses_with(product)
        graph.erase_node(node)


# softmax calls: (log, the argument names after x, positional order)
_SOFTMAX_FUNCTIONS = {F.softmax: (False, ("dim", "_stacklevel", "dtype")), torch.softmax: (False, ("dim", "dtype")),
                      F.log_softmax: (True, ("dim", "_stacklevel", "dtype")),
                      torch.log_softmax: (True, ("dim", "dtype"))}
_SOFTMAX_METHODS = {"softmax": (False, ("dim", "dtype")), "log_softmax": (True, ("dim", "dtype"))}


def _rewrite_softmax(gm: fx.GraphModule) -> None:
    """F.softmax(x, dim), torch.softmax, x.softmax(dim) and the log_softmax calls (dim positional or by name) ->
    SoftmaxOp modules, which prepare_qat gives an output fake quant. dtype= (other than None), a missing dim and
    the batch dim are refused here, naming the user's line."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS:
            log, names = _SOFTMAX_FUNCTIONS[node.target]
        elif node.op == "call_method" and node.target in _SOFTMAX_METHODS:
            log, names = _SOFTMAX_METHODS[node.target]
        else:
            continue
        if not node.args or not is_tensor(node.args[0]):
            continue
        arguments = {**dict(zip(names, node.args[1:])), **node.kwargs}
        name = "log_softmax" if log else "softmax"
        if arguments.get("dtype") is not None:
            raise QuantizationError(f"prepare_qat_fx: {name}(..., dtype={arguments['dtype']}) in {where(node)}: "
                                    f"the quantized {name} computes in integers and returns its own output dtype; "
                                    f"remove dtype=")
        dim = checked_dim(arguments.get("dim"), len(node.args[0].meta["tensor_meta"].shape), log,
                          f"prepare_qat_fx ({where(node)})")
        replace_with_module(gm, node, SoftmaxOp(dim, log), "softmax", node.args[0])


def _rewrite_tensor_arithmetic(gm: fx.GraphModule) -> None:
    """Tensor-tensor add/sub/mul/cat/maximum/minimum and activation +- number -> FloatFunctional calls. An operand
    computed from the model's own tensors only (a parameter or buffer such as the FAQ's epsilon, not the input) gets
    its own QuantStub first: the FAQ 2.3 Q10 fix, done for the user."""
    from hat.quant import fx_attention

    graph = gm.graph
    stubs: dict[fx.Node, fx.Node] = {}
    from_input = computed_from_input(graph)

    def quantized(arg, user):
        if not isinstance(arg, fx.Node) or arg in from_input:
            return arg
        if arg not in stubs:  # a parameter expanded to the batch (ViT's class token): QuantStub per sample
            stubs[arg] = fx_attention.quantized_per_sample(gm, arg, from_input, f"quant_{arg.name}", QuantStub())
        if stubs[arg] is None:
            name = f"quant_{arg.name}"
            gm.add_submodule(name, QuantStub())
            with graph.inserting_before(user):  # at its first user: after any in-place change (Swin v2's bias)
                stubs[arg] = graph.call_module(name, (arg,))
            stubs[arg].meta = dict(arg.meta)
        return stubs[arg]

    for node in list(graph.nodes):
        if node.op != "call_function" or node not in from_input:
            continue  # arithmetic on the model's own tensors only (Swin's mask) stays float, quantized where used
        if node.target in _BINARY and len(node.args) == 2 and all(is_tensor(a) for a in node.args):
            if node.kwargs:
                raise QuantizationError(f"prepare_qat_fx: {node.target.__name__}(..., {', '.join(node.kwargs)}=...) "
                                        f"in {where(node)}"
                                        f" is not supported; write it with plain operators (x + alpha * y)")
            method, args = _BINARY[node.target], node.args
        elif _adds_a_number(node, from_input):
            method, args = "add_scalar", _scalar_operands(graph, node, from_input)
        elif node.target in _EXTREMA and len(node.args) == 2 and all(is_tensor(a) for a in node.args):
            method, args = _EXTREMA[node.target], node.args
        elif node.target in (torch.cat, torch.concat) and isinstance(node.args[0], (list, tuple)) \
                and all(is_tensor(a) for a in node.args[0]):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            method, args = "cat", (list(node.args[0]), dim)
        else:
            continue
        name = f"{node.name}_float_functional"
        gm.add_submodule(name, from_source(FloatFunctional(), node))
        args = tuple([quantized(a, node) for a in arg] if isinstance(arg, list) else quantized(arg, node)
                     for arg in args)
        with graph.inserting_before(node):
            module = graph.get_attr(name)
            replacement = graph.call_function(call_float_functional, (module, method, *args))
        replacement.meta = node.meta  # later rewrites still see a tensor here ...
        if node in from_input:
            from_input.add(replacement)  # ... computed from the input
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    for arg in stubs:  # float expands of a parameter that expand_batch replaced
        if not arg.users and arg.op == "call_method":
            graph.erase_node(arg)


_ADD_SUB = {operator.add: 1, operator.iadd: 1, torch.add: 1, operator.sub: -1, operator.isub: -1, torch.sub: -1}


def _is_number(arg: Any) -> bool:
    return isinstance(arg, (int, float)) and not isinstance(arg, bool)


def _adds_a_number(node: fx.Node, from_input: set) -> bool:
    """x + c, c + x, x - c, c - x with x an activation: the sum can leave x's range (sigmoid(x) + 1), so it gets an
    observed output scale (FloatFunctional.add_scalar) instead of saturating on x's grid."""
    return (node.target in _ADD_SUB and len(node.args) == 2 and not node.kwargs
            and any(_is_number(a) for a in node.args)
            and any(is_tensor(a) and a in from_input for a in node.args))


def _scalar_operands(graph: fx.Graph, node: fx.Node, from_input: set) -> tuple[fx.Node, float]:
    """(activation, constant) of add_scalar for `node`; c - x becomes (-x) + c."""
    sign, (a, b) = _ADD_SUB[node.target], node.args
    if _is_number(b):
        return a, float(sign * b)
    if sign > 0:
        return b, float(a)
    with graph.inserting_before(node):
        negated = graph.call_function(operator.neg, (b,))
    negated.meta = dict(b.meta)
    from_input.add(negated)
    return negated, float(a)


def norm_floor(total: Any, eps: float) -> Any:
    """F.normalize's max(norm, eps) on the sum of squares: eps^2 in float; one step of its grid when quantized, so
    that the reciprocal square root table never meets 0 (an all-zero row: its output is 0 whatever the factor)."""
    return torch.clamp(total, min=float(total.scale) if isinstance(total, QTensor) else eps * eps)


def _rewrite_normalize(gm: fx.GraphModule) -> None:
    """F.normalize(x, dim=d) (Swin v2's cosine attention) -> x * rsqrt(sum(x * x, d, keepdim=True)): a mul, a sum,
    a reciprocal-square-root table and a broadcast mul, which the later rewrites quantize. Only p=2."""
    graph = gm.graph
    from_input = computed_from_input(graph)
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is F.normalize) or node not in from_input:
            continue
        bound = dict(zip(("input", "p", "dim", "eps"), node.args), **node.kwargs)
        if bound.get("p", 2.0) != 2.0 or bound.get("out") is not None:
            raise QuantizationError(f"prepare_qat_fx: F.normalize with p={bound.get('p')} in {where(node)}: only "
                                    f"the L2 norm (p=2) has a quantized form here")
        x, dim = bound["input"], bound.get("dim", 1)
        with graph.inserting_before(node):
            square = graph.call_function(operator.mul, (x, x))
            total = graph.call_function(torch.sum, (square,), {"dim": dim, "keepdim": True})
            floored = graph.call_function(norm_floor, (total, bound.get("eps", 1e-12)))
            inverse = graph.call_function(torch.rsqrt, (floored,))
            normalized = graph.call_function(operator.mul, (x, inverse))
        for made in (square, total, floored, inverse):
            made.meta = dict(x.meta)  # a tensor (the shape of the sum's differs; no rewrite reads it)
        normalized.meta = node.meta
        node.replace_all_uses_with(normalized)
        graph.erase_node(node)


def rewrite_calls(gm: fx.GraphModule) -> None:
    """Every rewrite, in the order they depend on each other (division makes a mul that the arithmetic pass takes)."""
    from hat.quant.fx_attention import rewrite_attention

    _rewrite_normalize(gm)
    rewrite_attention(gm)  # matmul calls, einsum, scaled_dot_product_attention, nn.MultiheadAttention -> a @ b, softmax
    _rewrite_elementwise(gm)
    _rewrite_softmax(gm)
    _rewrite_division(gm)
    _rewrite_tensor_arithmetic(gm)
