"""prepare_qat_fx's attention rewrites (hat/quant/attention.py has the design): matmul calls, plain-matmul einsum,
F.scaled_dot_product_attention and nn.MultiheadAttention become `a @ b` nodes (which fx_rewrites'
_rewrite_tensor_arithmetic turns into FloatFunctional.matmul calls), permutes, reshapes, a multiplication by the
scale and SoftmaxOp modules; and a parameter expanded to the batch (ViT's class token) is quantized per sample.
Every node made here carries its tensor_meta (computed on meta tensors) and the user's line, for later rewrites and
messages."""
from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from hat.quant import fx_tracer
from hat.quant.attention import expand_batch
from hat.quant.fx_common import from_source, is_tensor, where
from hat.quant.qtensor import QuantizationError
from hat.quant.softmax import SoftmaxOp


def rewrite_attention(gm: fx.GraphModule) -> None:
    """Every attention rewrite; run before the other call rewrites (they take the nodes made here)."""
    _rewrite_multihead_attention(gm)
    _rewrite_sdpa(gm)
    _rewrite_einsum(gm)
    _rewrite_matmul_calls(gm)


# --- making nodes ----------------------------------------------------------------------------------------------------
class _Builder:
    """New nodes before `anchor`, named after it, each with its tensor_meta and the anchor's stack trace."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node):
        self.gm, self.graph, self.anchor = gm, gm.graph, anchor

    def node(self, op: str, target: Any, args: tuple, suffix: str, value: Optional[torch.Tensor] = None) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, tuple(args), {}, name=f"{self.anchor.name}_{suffix}")
        node.meta["stack_trace"] = self.anchor.meta.get("stack_trace")
        node.meta["tensor_meta"] = _extract_tensor_metadata(value if value is not None else _on_meta(node))
        return node

    def method(self, name: str, x: fx.Node, *args: Any, suffix: str = "") -> fx.Node:
        return self.node("call_method", name, (x, *args), suffix or name)

    def permute(self, x: fx.Node, perm: list[int], suffix: str = "permute") -> fx.Node:
        return x if perm == sorted(perm) else self.method("permute", x, *perm, suffix=suffix)

    def matmul(self, a: fx.Node, b: fx.Node, suffix: str) -> fx.Node:
        return self.node("call_function", operator.matmul, (a, b), suffix)

    def module(self, module: nn.Module, suffix: str, x: fx.Node, value: torch.Tensor) -> fx.Node:
        target = f"{self.anchor.name}_{suffix}"
        self.gm.add_submodule(target, from_source(module, self.anchor))
        return self.node("call_module", target, (x,), suffix, value)

    def attention(self, q: fx.Node, k_t: fx.Node, v: fx.Node, scale: float, mask: Optional[fx.Node]) -> fx.Node:
        """softmax(q @ k_t * scale (+ mask), dim=-1) @ v."""
        scores = self.node("call_function", operator.mul, (self.matmul(q, k_t, "scores"), float(scale)), "scaled")
        if mask is not None:
            scores = self.node("call_function", operator.add, (scores, mask), "masked")
        probs = self.module(SoftmaxOp(-1), "softmax", scores, _meta(scores))
        return self.matmul(probs, v, "context")


def _meta(node: fx.Node) -> torch.Tensor:
    meta = node.meta["tensor_meta"]
    return torch.empty(meta.shape, dtype=meta.dtype, device="meta")


def _on_meta(node: fx.Node) -> torch.Tensor:
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), _meta)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)


def _shape(node: fx.Node) -> list[int]:
    return list(node.meta["tensor_meta"].shape)


def _replace(graph: fx.Graph, node: fx.Node, replacement: fx.Node) -> None:
    node.replace_all_uses_with(replacement)
    graph.erase_node(node)


# --- matmul calls ----------------------------------------------------------------------------------------------------
_MATMUL_FUNCTIONS = (torch.matmul, torch.bmm)
_MATMUL_METHODS = ("matmul", "bmm", "__matmul__")


def _rewrite_matmul_calls(gm: fx.GraphModule) -> None:
    """torch.matmul(a, b), torch.bmm(a, b), a.matmul(b), a.bmm(b) with two tensors -> a @ b."""
    for node in gm.graph.nodes:
        if not ((node.op == "call_function" and node.target in _MATMUL_FUNCTIONS)
                or (node.op == "call_method" and node.target in _MATMUL_METHODS)):
            continue
        kwargs = dict(node.kwargs)
        args = [*node.args, *(kwargs.pop(k) for k in ("input", "other", "mat2") if k in kwargs)]
        if len(args) != 2 or not all(is_tensor(a) for a in args):
            continue
        if kwargs:
            raise QuantizationError(f"prepare_qat_fx: matmul with {', '.join(kwargs)}=... in {where(node)} is not "
                                    f"supported; write a @ b")
        node.op, node.target, node.args, node.kwargs = "call_function", operator.matmul, tuple(args), {}


# --- einsum ----------------------------------------------------------------------------------------------------------
def _rewrite_einsum(gm: fx.GraphModule) -> None:
    """torch.einsum of two tensors whose equation is a (batched) matmul -> permutes + a @ b (+ a permute of the
    result): "bhqd,bhkd->bhqk", "bij,bjk->bik", "...id,...jd->...ij". Other equations are refused, naming the line."""
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is torch.einsum) or not node.args:
            continue
        equation, operands = node.args[0], list(node.args[1:])
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        if not isinstance(equation, str) or len(operands) != 2 or not all(is_tensor(a) for a in operands):
            continue
        plan = _einsum_plan(equation, [len(_shape(a)) for a in operands])
        if isinstance(plan, str):
            raise QuantizationError(f"prepare_qat_fx: torch.einsum({equation!r}, ...) in {where(node)}: {plan}. A "
                                    f"quantized model computes einsum of two activations as one matmul: batch "
                                    f"indices in both operands and the output, one index summed over, at most one "
                                    f"free index per operand (e.g. 'bhqd,bhkd->bhqk'); write other equations with "
                                    f"permute/reshape and @")
        x_perm, y_perm, x_free, y_free, out_perm = plan
        build = _Builder(gm, node)
        x, y = build.permute(operands[0], x_perm, "lhs"), build.permute(operands[1], y_perm, "rhs")
        if not x_free:
            x = build.method("unsqueeze", x, -2, suffix="lhs_row")
        if not y_free:
            y = build.method("unsqueeze", y, -1, suffix="rhs_column")
        out = build.matmul(x, y, "matmul")
        if not y_free:
            out = build.method("squeeze", out, -1, suffix="squeeze_column")
        if not x_free:
            out = build.method("squeeze", out, -1 if not y_free else -2, suffix="squeeze_row")
        _replace(gm.graph, node, build.permute(out, out_perm, "out"))


def _einsum_plan(equation: str, ranks: list[int]):
    """(x permutation, y permutation, x has a free index, y has one, output permutation) or why not a matmul."""
    equation = equation.replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    specs = inputs.split(",")
    if len(specs) != 2:
        return "it does not take two operands"
    if "." in equation:  # "..." = the same leading batch dims in each operand and the output
        extra = [rank - len(spec.replace("...", "")) for spec, rank in zip(specs, ranks)]
        if not all(spec.startswith("...") for spec in specs) or extra[0] != extra[1] or (
                arrow and not output.startswith("...")):
            return "'...' must lead both operands (with as many dims) and the output"
        dims = "".join(chr(0x100 + i) for i in range(extra[0]))
        specs, output = [spec.replace("...", dims) for spec in specs], output.replace("...", dims)
        if not arrow:
            arrow, output = "->", dims + "".join(sorted(
                c for c in set("".join(specs)) if "".join(specs).count(c) == 1 and c not in dims))
    elif not arrow:
        output = "".join(sorted(c for c in set("".join(specs)) if "".join(specs).count(c) == 1))
    xs, ys = specs
    if any(len(set(s)) != len(s) for s in (xs, ys, output)) or any(len(s) != r for s, r in zip(specs, ranks)):
        return "an index repeats within an operand (a diagonal), or an operand's indices do not match its dims"
    if any(c not in xs + ys for c in output):
        return "the output has an index no operand has"
    batch = [c for c in output if c in xs and c in ys]
    x_free, y_free = [c for c in xs if c not in ys], [c for c in ys if c not in xs]
    summed = [c for c in xs if c in ys and c not in output]
    if any(c not in output for c in x_free + y_free):
        return "it sums over an index of one operand only"
    if len(summed) != 1 or len(x_free) > 1 or len(y_free) > 1:
        return f"it sums over {len(summed)} indices with {len(x_free)} and {len(y_free)} free indices"
    x_perm = [xs.index(c) for c in batch + x_free + summed]
    y_perm = [ys.index(c) for c in batch + summed + y_free]
    result = batch + x_free + y_free
    return x_perm, y_perm, bool(x_free), bool(y_free), [result.index(c) for c in output]


# --- scaled_dot_product_attention ------------------------------------------------------------------------------------
_SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _rewrite_sdpa(gm: fx.GraphModule) -> None:
    """F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale) -> softmax(q @ k^T * scale
    (+ a float attn_mask), dim=-1) @ v; scale defaults to 1 / sqrt(q.size(-1)); dropout is not applied."""
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is F.scaled_dot_product_attention):
            continue
        arguments = {**dict(zip(_SDPA_ARGUMENTS, node.args)), **node.kwargs}
        q, k, v = (arguments.get(name) for name in _SDPA_ARGUMENTS[:3])
        if not all(is_tensor(a) for a in (q, k, v)):
            continue
        if arguments.get("enable_gqa"):
            raise _refused(node, "scaled_dot_product_attention", "enable_gqa=True",
                           "repeat the key and value heads to the query's (repeat_interleave before the call)")
        mask = _additive_mask(node, "scaled_dot_product_attention", arguments.get("attn_mask"),
                              arguments.get("is_causal", False))
        scale = arguments.get("scale")
        if scale is not None and not isinstance(scale, (int, float)):
            raise _refused(node, "scaled_dot_product_attention", "a scale computed in forward",
                           "pass a Python number (or None: 1 / sqrt(head dim))")
        scale = 1.0 / math.sqrt(_shape(q)[-1]) if scale is None else scale
        rank = len(_shape(k))
        build = _Builder(gm, node)
        k_t = build.permute(k, [*range(rank - 2), rank - 1, rank - 2], "key_t")
        _replace(gm.graph, node, build.attention(q, k_t, v, scale, mask))


def _additive_mask(node: fx.Node, what: str, mask: Any, is_causal: bool) -> Optional[fx.Node]:
    """The float attention mask to add to the scores (None: no mask); boolean masks and is_causal refused."""
    if is_causal:
        raise _refused(node, what, "is_causal=True", "an integer softmax of saturated scores cannot give the masked "
                       "positions exactly zero weight; compute causal attention outside the quantized part, or add "
                       "a finite float mask (attn_mask) if approximate zeros are acceptable")
    if mask is None:
        return None
    if not is_tensor(mask) or mask.meta["tensor_meta"].dtype == torch.bool:
        raise _refused(node, what, "a boolean (or non-tensor) attn_mask", "pass a float additive mask with finite "
                       "values (e.g. a relative position bias); -inf cannot be quantized")
    return mask


def _refused(node: fx.Node, what: str, feature: str, fix: str) -> QuantizationError:
    return QuantizationError(f"prepare_qat_fx: {what} with {feature} in {where(node)} is not supported in a "
                             f"quantized model: {fix}")


# --- nn.MultiheadAttention -------------------------------------------------------------------------------------------
_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _rewrite_multihead_attention(gm: fx.GraphModule) -> None:
    """nn.MultiheadAttention calls -> in-projection Linear(s) sharing the module's parameters, heads by reshape +
    permute, the attention of _Builder.attention, merge, the module's out_proj (hat/quant/attention.py)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
            continue
        mha: nn.MultiheadAttention = gm.get_submodule(node.target)
        bound = _MHA_SIGNATURE.bind(mha, *node.args, **node.kwargs)
        bound.apply_defaults()
        a = bound.arguments
        query, key, value = a["query"], a["key"], a["value"]
        what = f"nn.MultiheadAttention '{node.target}'"
        if a["key_padding_mask"] is not None:
            raise _refused(node, what, "a key_padding_mask", "pad the keys with a float additive attn_mask instead")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise _refused(node, what, "add_bias_kv / add_zero_attn", "build the attention without them")
        if not all(is_tensor(t) and len(_shape(t)) == 3 for t in (query, key, value)):
            raise _refused(node, what, "unbatched (2-d) inputs", "give query, key and value a batch dim")
        users = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1) for u in users):
            raise _refused(node, what, "its output tuple used as a whole", "unpack it: out, _ = attention(q, k, v)")
        if any(u.args[1] == 1 and u.users for u in users) and a["need_weights"]:
            raise _refused(node, what, "the attention weights used (need_weights=True)",
                           "the rewritten attention does not return them; call it with need_weights=False")
        mask = _additive_mask(node, what, a["attn_mask"], a["is_causal"])
        output = _multihead(gm, node, mha, query, key, value, mask)
        for user in users:
            if user.args[1] == 0:
                user.replace_all_uses_with(output)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)


def _multihead(gm: fx.GraphModule, node: fx.Node, mha: nn.MultiheadAttention, query: fx.Node, key: fx.Node,
               value: fx.Node, mask: Optional[fx.Node]) -> fx.Node:
    build = _Builder(gm, node)
    heads, head_dim, embed = mha.num_heads, mha.head_dim, mha.embed_dim
    if not mha.batch_first:  # (L, N, E) -> (N, L, E): the batch leads, as the program wants
        query, key, value = (build.permute(t, [1, 0, 2], f"{name}_batch_first")
                             for t, name in ((query, "query"), (key, "key"), (value, "value")))
    projected = _in_projection(build, mha, {"query": query, "key": key, "value": value})
    q, k, v = (build.method("reshape", projected[name], -1, _shape(projected[name])[1], heads, head_dim,
                            suffix=f"{name}_heads") for name in ("query", "key", "value"))
    q, k_t, v = build.permute(q, [0, 2, 1, 3], "query_t"), build.permute(k, [0, 2, 3, 1], "key_t"), \
        build.permute(v, [0, 2, 1, 3], "value_t")
    if mask is not None and len(_shape(mask)) == 3:  # (N * H, L, S) -> (N, H, L, S)
        mask = build.method("reshape", mask, -1, heads, *_shape(mask)[1:], suffix="mask_heads")
    context = build.permute(build.attention(q, k_t, v, 1.0 / math.sqrt(head_dim), mask), [0, 2, 1, 3], "merge")
    merged = build.method("reshape", context, -1, _shape(context)[1], embed, suffix="merged")
    out_proj = f"{node.target}.out_proj"
    out = build.node("call_module", out_proj, (merged,), "out_proj",
                     torch.empty(*_shape(merged)[:-1], mha.out_proj.out_features, device="meta"))
    return out if mha.batch_first else build.permute(out, [1, 0, 2], "batch_second")


def _in_projection(build: _Builder, mha: nn.MultiheadAttention, inputs: dict[str, fx.Node]) -> dict[str, fx.Node]:
    """q, k, v projected: one packed Linear(E, 3E) holding in_proj_weight / in_proj_bias, applied once per distinct
    input and sliced; or, with separate q/k/v weights, one Linear each (bias copies: slices of in_proj_bias)."""
    embed, bias = mha.embed_dim, mha.in_proj_bias
    if not mha._qkv_same_embed_dim:
        out = {}
        for i, (name, weight) in enumerate(zip(inputs, (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))):
            linear = nn.Linear(weight.shape[1], embed, bias=bias is not None)
            linear.weight = weight
            if bias is not None:
                linear.bias = nn.Parameter(bias.detach()[i * embed:(i + 1) * embed].clone())
            out[name] = build.module(linear, f"{name}_proj", inputs[name],
                                     torch.empty(*_shape(inputs[name])[:-1], embed, device="meta"))
        return out
    packed = nn.Linear(embed, 3 * embed, bias=bias is not None)
    packed.weight = mha.in_proj_weight
    if bias is not None:
        packed.bias = bias
    target = f"{build.anchor.name}_in_proj"
    build.gm.add_submodule(target, from_source(packed, build.anchor))
    projected: dict[fx.Node, fx.Node] = {}
    out = {}
    for i, (name, x) in enumerate(inputs.items()):
        if x not in projected:
            projected[x] = build.node("call_module", target, (x,), "in_proj",
                                      torch.empty(*_shape(x)[:-1], 3 * embed, device="meta"))
        out[name] = build.node("call_function", operator.getitem,
                               (projected[x], (Ellipsis, slice(i * embed, (i + 1) * embed))), name)
    return out


# --- a parameter expanded to the batch -------------------------------------------------------------------------------
def per_sample(gm: fx.GraphModule, node: fx.Node, from_input: set) -> Optional[tuple[fx.Node, fx.Node]]:
    """For `p.expand(n, ...)` / `p.repeat(n, 1, ...)` with p a tensor of the model's own (batch 1) and n an
    activation's batch size (x.shape[0], x.size(0), len(x)): (p for one sample, the activation x). The caller
    quantizes the one sample and expands the QTensor with expand_batch: no batch size in the program."""
    if node.op != "call_method" or node.target not in ("expand", "repeat") or len(node.args) < 2:
        return None
    p, sizes = node.args[0], list(node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    like = _batch_of(sizes[0], from_input)
    if like is None or not is_tensor(p) or p in from_input or node.kwargs:
        return None
    shape = _shape(p)
    if node.target == "repeat":
        if len(sizes) != len(shape) or shape[0] != 1 or any(s != 1 for s in sizes[1:]):
            return None
        return p, like
    if len(sizes) < len(shape) or (len(sizes) == len(shape) and shape[0] != 1):
        return None
    if len(sizes) == len(shape) and all(s == -1 for s in sizes[1:]):
        return p, like
    if not all(isinstance(s, int) for s in sizes[1:]):
        return None
    one = _Builder(gm, node).method("expand", p, 1, *sizes[1:], suffix="one_sample")
    return one, like


def _batch_of(size: Any, from_input: set) -> Optional[fx.Node]:
    """The activation whose batch size `size` is (x.shape[0], x.size(0), x.size()[0], len(x)), else None."""
    if not isinstance(size, fx.Node):
        return None
    source = None
    if size.op == "call_function" and size.target is operator.getitem and size.args[1:] == (0,):
        shape = size.args[0]
        if isinstance(shape, fx.Node) and fx_tracer.reads_metadata(shape) and (
                shape.target == "size" and len(shape.args) == 1 or shape.args[1:] == ("shape",)):
            source = shape.args[0]
    elif size.op == "call_method" and size.target == "size" and (size.args[1:] == (0,) or size.kwargs == {"dim": 0}):
        source = size.args[0]
    elif size.op == "call_function" and size.target is len:
        source = size.args[0]
    return source if is_tensor(source) and source in from_input else None


def quantized_per_sample(gm: fx.GraphModule, node: fx.Node, from_input: set, stub_name: str, stub: nn.Module
                         ) -> Optional[fx.Node]:
    """The quantized operand for `node` when it is a parameter expanded to the batch (per_sample): QuantStub on
    the one sample, then expand_batch; None otherwise."""
    found = per_sample(gm, node, from_input)
    if found is None:
        return None
    one, like = found
    gm.add_submodule(stub_name, stub)
    graph = gm.graph
    with graph.inserting_before(node):
        quantized = graph.call_module(stub_name, (one,))
        expanded = graph.call_function(expand_batch, (quantized, like))
    quantized.meta, expanded.meta = dict(one.meta), dict(node.meta)
    return expanded

