"""Graph mode: prepare a plain torch model (torchvision resnet18, mobilenet_v2, ...) for QAT with no code changes.

trace (shape branches decided by the example: fx_tracer.py) -> add QuantStub after each input and DeQuantStub before
each output -> fuse conv/linear + bn (+ relu/relu6) chains found in the graph -> rewrite calls into the modules
prepare_qat swaps (fx_rewrites.py) -> the eager prepare_qat on the resulting GraphModule. -x, x * 2 and x[0] need
no rewrite: QTensor handles them (FAQ 2.4 Q11-Q13); x + 1 and 1 - x get an observed output scale (add_scalar).
"""
from __future__ import annotations

import traceback
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from hat.quant import fx_tracer
from hat.quant.convert import convert
from hat.quant.fuse import ACTIVATIONS, NORMS, STANDALONE_NORMS, WEIGHTED, FusedLayer, replace_module
from hat.quant.fx_common import computed_from_input
from hat.quant.fx_modules import rewrite_parameter_calls
from hat.quant.fx_rewrites import rewrite_calls
from hat.quant.fx_tracer import ShapeBranchError, ShapeTracer
from hat.quant.prepare import copy_model, prepare_qat
from hat.quant.qtensor import QuantizationError
from hat.quant.stubs import DeQuantStub, QuantStub

_FUNCTIONAL_ACTIVATIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}


def prepare_qat_fx(model: nn.Module, qconfig_dict: Optional[dict[str, Any]] = None,
                   example_inputs: Sequence[torch.Tensor] = ()) -> fx.GraphModule:
    """The QAT GraphModule of a plain torch model; `example_inputs` (a tuple) tells tensors from other values."""
    return prepare_qat(quant_friendly(model, example_inputs), qconfig_dict, inplace=True)


def quant_friendly(model: nn.Module, example_inputs: Sequence[torch.Tensor], stubs: bool = True) -> fx.GraphModule:
    """A copy of a plain torch model as a GraphModule that the eager prepare_qat takes: (QuantStub/DeQuantStub at
    the inputs and outputs when `stubs`), conv/linear + bn (+ relu) grouped, tensor arithmetic through
    FloatFunctional. It computes what the model computes; its parameters and buffers are the model's."""
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise ValueError("prepare_qat_fx needs example_inputs=(x,) (a tuple of the forward's arguments) to tell "
                         "tensor arithmetic from shape arithmetic")
    gm = _trace(copy_model(model).eval(), example_inputs)
    ShapeProp(gm).propagate(*example_inputs)
    if stubs:
        _add_stubs(gm)
    rewrite_parameter_calls(gm, model)  # F.batch_norm (timm's BatchNormAct2d), F.linear, F.prelu -> modules, to fuse
    _fuse(gm)
    rewrite_calls(gm)
    _mark_constant_modules(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.train(model.training)


def convert_fx(model: fx.GraphModule) -> fx.GraphModule:
    """The quantized version of a prepare_qat_fx model (the same module swap as convert)."""
    return convert(model)


def _trace(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    tracer = ShapeTracer(example_inputs)  # branches on shapes follow the example; on tensor values they fail
    try:
        return fx.GraphModule(model, tracer.trace(model), type(model).__name__)
    except fx.proxy.TraceError as exc:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename
                  and f.filename != fx_tracer.__file__]
        where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else "the model's forward"
        if isinstance(exc, ShapeBranchError):
            raise QuantizationError(f"prepare_qat_fx cannot trace {type(model).__name__}: {where}: {exc}") from None
        raise QuantizationError(
            f"prepare_qat_fx cannot trace {type(model).__name__}: {where} uses a tensor value in Python control "
            f"flow ({exc}), which graph mode cannot record (FAQ 2.4 Q10; branches on shapes are fine). Make the "
            f"branch depend on shapes or settings, move it out of forward, or use the eager prepare_qat with "
            f"QuantStub/DeQuantStub") from None


def _add_stubs(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for index, node in enumerate([n for n in graph.nodes if n.op == "placeholder" and "tensor_meta" in n.meta]):
        name = f"quant_input_{index}"
        gm.add_submodule(name, QuantStub())
        with graph.inserting_after(node):
            stub = graph.call_module(name, (node,))
        stub.meta = dict(node.meta)
        node.replace_all_uses_with(stub, delete_user_cb=lambda user, stub=stub: user is not stub)
    output = next(n for n in graph.nodes if n.op == "output")
    gm.add_submodule("dequant_output", DeQuantStub())
    with graph.inserting_before(output):
        output.args = (fx.node.map_arg(output.args[0], lambda n: graph.call_module("dequant_output", (n,))),)


def _fuse(gm: fx.GraphModule) -> None:
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) not in WEIGHTED or calls[node.target] > 1:
            continue  # a layer called twice cannot carry one call's bn/relu into the other
        layer = modules[node.target]
        chain, bn, activation = [node], None, None
        following = _only_user(chain[-1])
        if following is not None and following.op == "call_module" \
                and type(modules[following.target]) is NORMS[type(layer)]:
            bn = modules[following.target]
            chain.append(following)
            following = _only_user(following)
        if following is not None:
            activation = _activation_of(following, modules)
            if activation is not None:
                chain.append(following)
        if len(chain) > 1:
            replace_module(gm, node.target, FusedLayer(layer, bn, activation))
            for fused_away in reversed(chain[1:]):
                fused_away.replace_all_uses_with(node)
                gm.graph.erase_node(fused_away)
    # a batch norm that no conv/linear precedes (those are gone now) + relu/relu6: the standalone batch-norm op
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) not in STANDALONE_NORMS \
                or calls[node.target] > 1:
            continue
        following = _only_user(node)
        activation = _activation_of(following, modules) if following is not None else None
        if activation is not None:
            replace_module(gm, node.target, FusedLayer(modules[node.target], None, activation))
            following.replace_all_uses_with(node)
            gm.graph.erase_node(following)


def _mark_constant_modules(gm: fx.GraphModule) -> None:
    """Modules called on the model's own tensors only (Swin v2's position-bias MLP on a coordinate table) are float
    code on constants: they train in float, prepare_qat leaves them as they are, and a program holds their output as
    a constant (quantized where it meets activations)."""
    from_input = computed_from_input(gm.graph)
    calls = [node for node in gm.graph.nodes if node.op == "call_module"]
    on_activations = {node.target for node in calls if node in from_input}  # a module used on both is quantized
    for node in calls:
        if node.target not in on_activations \
                and not isinstance(gm.get_submodule(node.target), QuantStub):  # a stub quantizes it for its user
            for module in gm.get_submodule(node.target).modules():
                module.hat_constant = True


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    """The one node that uses `node`'s values; reads of its shape (timm's `_assert(x.ndim == 4)`) do not count."""
    users = [user for user in node.users  # x.shape, x.ndim, x.size(): the fused layer keeps the shape
             if not (user.args[:1] == (node,) and fx_tracer.reads_metadata(user))]
    return users[0] if len(users) == 1 else None


def _activation_of(node: fx.Node, modules: dict) -> Optional[str]:
    if node.op == "call_module":
        return ACTIVATIONS.get(type(modules[node.target]))
    if node.op == "call_function" and node.target in _FUNCTIONAL_ACTIVATIONS:
        return _FUNCTIONAL_ACTIVATIONS[node.target]
    return None
