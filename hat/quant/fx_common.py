"""What the graph rewrites of prepare_qat_fx share: where the user wrote a node, modules that remember it, and the
model's own tensors."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from hat.quant import fx_tracer


def where(node: fx.Node) -> str:
    """Where the user wrote `node`: 'file.py:12: y = a + b' (the last frame of its stack trace)."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+(?:\n {3,}(?!File)(.*))?', node.meta.get("stack_trace") or "")
    user = [frame for frame in frames if "/torch/" not in frame[0] and frame[0] != fx_tracer.__file__]
    if not user:
        return "the forward"
    path, line, code = user[-1]
    return f"{Path(path).name}:{line}" + (f": {code.strip()}" if code.strip() else "")


def from_source(module: nn.Module, node: fx.Node) -> nn.Module:
    """A module standing for the user's call `node`: messages about it name the user's line, not its own name."""
    module.hat_source = where(node)
    return module


def is_tensor(arg: Any) -> bool:
    return isinstance(arg, fx.Node) and "tensor_meta" in arg.meta


def is_parameter(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:
        return False
    return True


def attribute(gm: fx.GraphModule, target: str) -> torch.Tensor:
    return gm.get_parameter(target) if is_parameter(gm, target) else gm.get_buffer(target)


def free_name(gm: fx.GraphModule, name: str) -> str:
    candidate, index = name, 1
    while hasattr(gm, candidate):
        candidate, index = f"{name}_{index}", index + 1
    return candidate


def replace_with_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, suffix: str, x: fx.Node) -> fx.Node:
    """Put `module(x)` in place of the call `node` (the module named after it and remembering the user's line)."""
    target = f"{node.name}_{suffix}"
    gm.add_submodule(target, from_source(module, node))
    with gm.graph.inserting_before(node):
        replacement = gm.graph.call_module(target, (x,))
    replacement.meta = node.meta
    node.replace_all_uses_with(replacement)
    gm.graph.erase_node(node)
    return replacement


def computed_from_input(graph: fx.Graph) -> set[fx.Node]:
    """The nodes computed from the model input's values. Reads of its metadata (x.shape, x.size(0), x.dim()) and
    what is computed from them only are not: `self.class_token.expand(x.shape[0], -1, -1)` is the model's own
    tensor, which gets a QuantStub where it meets an activation."""
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or (not fx_tracer.reads_metadata(node)
                                         and any(n in found for n in node.all_input_nodes)):
            found.add(node)
    return found
