"""Graph rewrites of calls that use the model's own parameters: F.batch_norm (timm's BatchNormAct2d), F.linear and
F.prelu become the modules prepare_qat swaps, sharing those parameters. They run before fusion, so a rewritten
linear or batch norm fuses with its neighbours like a module written as one."""
from __future__ import annotations

import inspect
import operator
from typing import Any

import torch.nn.functional as F
from torch import fx, nn

from hat.quant.fuse import replace_module
from hat.quant.fx_common import (attribute, computed_from_input, free_name, is_parameter, is_tensor,
                                 replace_with_module, where)
from hat.quant.qtensor import QuantizationError


def rewrite_parameter_calls(gm: fx.GraphModule, model: nn.Module) -> None:
    """F.batch_norm, F.linear, F.prelu on the model's parameters -> BatchNorm / Linear / PReLU modules."""
    rewrite_functional_batch_norm(gm, model)
    _rewrite_linear(gm)
    _rewrite_prelu(gm)
    _rewrite_norms(gm)


_BATCH_NORM_TENSORS = ("running_mean", "running_var", "weight", "bias")


def rewrite_functional_batch_norm(gm: fx.GraphModule, model: nn.Module) -> None:
    """F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) whose tensors are the
    attributes of one batch-norm module of `model` (timm's BatchNormAct2d: an nn.BatchNorm2d subclass whose forward
    calls F.batch_norm, then its activation) -> a call of a plain nn.BatchNorm2d (nn.BatchNorm1d for a 2-d or 3-d x)
    holding that module's very parameters and buffers (QAT trains them and updates the statistics), with the
    module's eps and momentum. Run before _fuse, which folds it into a preceding conv or makes it the standalone
    batch-norm op with a following relu. The plain module takes the batch norm's own name where the traced module
    held only its tensors and submodules (its other submodules, e.g. timm's `act`, move to `<name>_<child>`), so the
    prepared keys read `bn1.bn.weight` as for an nn.BatchNorm2d. Calls of nn.Identity modules (timm's `drop`) are
    dropped first: they would stand between a norm and its activation."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Identity and len(node.args) == 1 \
                and not node.kwargs and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    made: dict[str, str] = {}  # owner's name -> the plain batch norm's target
    signature = inspect.signature(F.batch_norm)
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is F.batch_norm):
            continue
        bound = signature.bind(*node.args, **node.kwargs).arguments
        x = bound["input"]
        if not is_tensor(x):
            continue
        owner = _batch_norm_owner(gm, model, node, bound)
        if owner not in made:
            made[owner] = _plain_batch_norm(gm, model, owner, bound, len(x.meta["tensor_meta"].shape), node)
        with graph.inserting_before(node):
            replacement = graph.call_module(made[owner], (x,))
        replacement.meta = node.meta
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        for name in _BATCH_NORM_TENSORS:
            tensor = bound.get(name)
            if isinstance(tensor, fx.Node) and not tensor.users:
                graph.erase_node(tensor)


def _batch_norm_owner(gm: fx.GraphModule, model: nn.Module, node: fx.Node, bound: dict[str, Any]) -> str:
    """The name of the batch-norm module of `model` whose running_mean/running_var/weight/bias the call takes."""
    targets = {name: bound[name].target for name in _BATCH_NORM_TENSORS
               if isinstance(bound.get(name), fx.Node) and bound[name].op == "get_attr"}
    owners = {target.rpartition(".")[0] for target in targets.values()}
    owner = next(iter(owners)) if len(owners) == 1 else None
    module = None
    if owner is not None:
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            module = None
    matches = isinstance(module, nn.modules.batchnorm._BatchNorm) and all(
        targets.get(name) == (f"{owner}.{name}" if owner else name) if getattr(module, name) is not None
        else bound.get(name) is None for name in _BATCH_NORM_TENSORS)
    if not matches:
        raise QuantizationError(f"prepare_qat_fx: F.batch_norm in {where(node)} does not take the running_mean, "
                                f"running_var, weight and bias of one batch-norm module of the model; hold them in "
                                f"an nn.BatchNorm2d (or call it), so that convert can fold fixed statistics")
    return owner


def _plain_batch_norm(gm: fx.GraphModule, model: nn.Module, owner: str, bound: dict[str, Any], dims: int,
                      node: fx.Node) -> str:
    """A plain batch norm sharing the owner's tensors, in the graph module; returns its target."""
    if dims not in (2, 3, 4):
        raise QuantizationError(f"prepare_qat_fx: F.batch_norm in {where(node)} on a {dims}-dim input; a quantized "
                                f"batch norm takes (N, C), (N, C, L) or (N, C, H, W)")
    original = model.get_submodule(owner)
    plain = (nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d)(
        original.num_features, eps=bound.get("eps", original.eps), momentum=original.momentum,
        affine=original.affine, track_running_stats=original.track_running_stats)
    for name in _BATCH_NORM_TENSORS:  # the graph module's own tensors (a copy of the model's): shared, not copied
        if bound.get(name) is not None:
            setattr(plain, name, attribute(gm, bound[name].target))
    if original.track_running_stats and original.num_batches_tracked is not None:
        plain.num_batches_tracked = original.num_batches_tracked.detach().clone()
    holder = gm.get_submodule(owner) if owner else gm
    children = dict(holder.named_children())
    own = [n for n in gm.graph.nodes if n.op in ("call_module", "get_attr") and owner
           and n.target.rpartition(".")[0] == owner and n.target.rpartition(".")[2] not in children]
    # in place: the holder is the container fx made for the traced module, and only this call reads its tensors
    in_place = bool(owner) and type(holder) is nn.Module and all(
        n.target.rpartition(".")[2] in _BATCH_NORM_TENSORS and set(n.users) == {node} for n in own)
    if not in_place:  # keep the holder as it is (other code reads it): the plain batch norm gets a name of its own
        target = free_name(gm, f"{owner.replace('.', '_') or 'batch_norm'}_bn")
        gm.add_submodule(target, plain)
        return target
    for child, module in children.items():  # e.g. timm's `act`: moved next to the batch norm
        moved = free_name(gm, f"{owner.replace('.', '_')}_{child}")
        gm.add_submodule(moved, module)
        for n in gm.graph.nodes:
            if n.op in ("call_module", "get_attr") and (n.target == f"{owner}.{child}"
                                                        or n.target.startswith(f"{owner}.{child}.")):
                n.target = moved + n.target[len(f"{owner}.{child}"):]
    replace_module(gm, owner, plain)
    return owner


def _rewrite_linear(gm: fx.GraphModule) -> None:
    """F.linear(x, weight, bias) with weight (and bias) parameters or buffers the model holds -> an nn.Linear holding
    those very tensors (QAT keeps training them), which prepare_qat swaps like any Linear. A bias computed in forward
    from the model's own tensors (Swin v2's qkv bias with its k part zeroed) is added after the linear instead; a
    weight computed in forward is refused: the quantized linear needs its integer weights at convert."""
    graph = gm.graph
    from_input = computed_from_input(graph)
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is F.linear):
            continue
        bound = dict(zip(("input", "weight", "bias"), node.args), **node.kwargs)
        x, weight, bias = bound.get("input"), bound.get("weight"), bound.get("bias")
        if not is_tensor(x):
            continue
        held = [t is None or (isinstance(t, fx.Node) and t.op == "get_attr") for t in (weight, bias)]
        added_bias = None if held[1] else bias  # Swin v2's qkv bias with its k part zeroed: added after the linear
        if weight is None or not held[0] or (added_bias is not None and (added_bias in from_input
                                                                         or not is_tensor(added_bias))):
            raise QuantizationError(f"prepare_qat_fx: F.linear in {where(node)} takes a weight computed in forward "
                                    f"(or a bias computed from the input); hold them as nn.Parameters of the model "
                                    f"(or use nn.Linear), so that convert can turn them into integers")
        tensors = [None if t is None or t is added_bias else attribute(gm, t.target) for t in (weight, bias)]
        if tensors[0].dim() != 2 or (tensors[1] is not None and list(tensors[1].shape) != [tensors[0].shape[0]]):
            raise QuantizationError(f"prepare_qat_fx: F.linear in {where(node)} has a weight of shape "
                                    f"{list(tensors[0].shape)} and a bias of shape "
                                    f"{None if tensors[1] is None else list(tensors[1].shape)}; expected [out, in] "
                                    f"and [out]")
        module = nn.Linear(tensors[0].shape[1], tensors[0].shape[0], bias=tensors[1] is not None)
        for name, value in zip(("weight", "bias"), tensors):  # the model's own parameters; a buffer stays fixed
            if value is not None:
                setattr(module, name, value if isinstance(value, nn.Parameter)
                        else nn.Parameter(value.detach().clone(), False))
        linear = replace_with_module(gm, node, module, "linear", x)
        if added_bias is not None:  # a tensor-tensor add: the arithmetic rewrite quantizes the bias where it meets
            with graph.inserting_after(linear):
                biased = graph.call_function(operator.add, (linear, added_bias))
            biased.meta = dict(linear.meta)
            linear.replace_all_uses_with(biased, delete_user_cb=lambda user: user is not biased)
        for t in (weight, bias):
            if t is not None and t.op == "get_attr" and not t.users:
                graph.erase_node(t)


def _rewrite_prelu(gm: fx.GraphModule) -> None:
    """F.prelu(x, weight) / torch.prelu / x.prelu(weight), weight a parameter (or buffer) the model holds -> an
    nn.PReLU module holding that very parameter (QAT keeps training it), which prepare_qat swaps for QATPReLU. A
    weight computed in forward is refused: the quantized PReLU needs its slopes at convert."""
    graph = gm.graph
    for node in list(graph.nodes):
        if not ((node.op == "call_function" and node.target is F.prelu)
                or (node.op == "call_method" and node.target == "prelu")):
            continue
        x = node.args[0] if node.args else node.kwargs.get("input")
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if not is_tensor(x):
            continue
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            raise QuantizationError(f"prepare_qat_fx: prelu in {where(node)} takes a weight computed in forward; "
                                    f"hold the slopes as an nn.Parameter of the model (or use nn.PReLU), so that "
                                    f"convert can turn them into integer multipliers")
        value = gm.get_parameter(weight.target) if is_parameter(gm, weight.target) else \
            gm.get_buffer(weight.target)
        if value.dim() > 1:
            raise QuantizationError(f"prepare_qat_fx: prelu in {where(node)} has a weight of shape "
                                    f"{list(value.shape)}; PReLU takes one slope or one per channel (1-d)")
        module = nn.PReLU(num_parameters=max(value.numel(), 1))
        # the model's own parameter (trained on); a buffer is a fixed slope
        module.weight = value if isinstance(value, nn.Parameter) else nn.Parameter(value.detach().clone(), False)
        replace_with_module(gm, node, module, "prelu", x)
        if not weight.users:
            graph.erase_node(weight)


_NORM_ARGUMENTS = {F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
                   F.group_norm: ("input", "num_groups", "weight", "bias", "eps")}


def _rewrite_norms(gm: fx.GraphModule) -> None:
    """F.layer_norm(x, normalized_shape, weight, bias, eps) and F.group_norm(x, num_groups, weight, bias, eps), the
    weight and bias parameters (or buffers) the model holds or None -> an nn.LayerNorm / nn.GroupNorm holding those
    very tensors (QAT keeps training them), which prepare_qat swaps for QATLayerNorm (torchvision's LayerNorm2d:
    permute, F.layer_norm, permute back)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target in _NORM_ARGUMENTS):
            continue
        names = _NORM_ARGUMENTS[node.target]
        bound = dict(zip(names, node.args), **node.kwargs)
        x, weight, bias, eps = bound.get("input"), bound.get("weight"), bound.get("bias"), bound.get("eps", 1e-5)
        if not is_tensor(x):
            continue
        call = "F.layer_norm" if node.target is F.layer_norm else "F.group_norm"
        if not all(t is None or (isinstance(t, fx.Node) and t.op == "get_attr") for t in (weight, bias)):
            raise QuantizationError(f"prepare_qat_fx: {call} in {where(node)} takes a weight or bias computed in "
                                    f"forward; hold them as nn.Parameters of the model (or use the nn module), so "
                                    f"that convert can fold them into integer multipliers")
        setting = bound.get(names[1])
        shape = [setting] if isinstance(setting, int) else list(setting) if isinstance(setting, (list, tuple)) \
            else None
        if shape is None or not all(isinstance(v, int) for v in shape) or not isinstance(eps, (int, float)):
            raise QuantizationError(f"prepare_qat_fx: {call} in {where(node)} with {names[1]}={setting!r} and "
                                    f"eps={eps!r}; give them as numbers (fixed at convert)")
        tensors = [None if t is None else attribute(gm, t.target) for t in (weight, bias)]
        if node.target is F.layer_norm:
            module = nn.LayerNorm(shape, eps=float(eps), elementwise_affine=False)
        else:
            module = nn.GroupNorm(shape[0], x.meta["tensor_meta"].shape[1], eps=float(eps), affine=False)
        for name, value in zip(("weight", "bias"), tensors):  # the model's own parameters; a buffer stays fixed
            if value is not None:
                setattr(module, name, value if isinstance(value, nn.Parameter)
                        else nn.Parameter(value.detach().clone(), False))
        replace_with_module(gm, node, module, "layer_norm" if node.target is F.layer_norm else "group_norm", x)
        for t in (weight, bias):
            if t is not None and not t.users:
                graph.erase_node(t)
