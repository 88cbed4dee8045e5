"""Fusion: conv/linear + batch norm (+ relu/relu6) become one FusedLayer, which prepare_qat turns into one
QAT layer that folds the batch norm into the weights (the deployed conv has no separate BN).

Eager models are fused where the pattern sits in an nn.Sequential (the zoo's ConvBNAct) or where named
explicitly with `fuse_modules(model, [["conv", "bn", "relu"]])`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

WEIGHTED = (nn.Conv2d, nn.Linear)
NORMS = {nn.Conv2d: nn.BatchNorm2d, nn.Linear: nn.BatchNorm1d}
ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
# a batch norm that leads a group: FusedLayer(bn, None, activation), the standalone batch-norm op (batch_norm.py)
STANDALONE_NORMS = (nn.BatchNorm2d, nn.BatchNorm1d)
# What the conv/linear output stage applies (J5: a clip at 0, and at an upper bound): name -> upper bound
FUSED_UPPER_BOUND: dict[str, Optional[float]] = {"relu": None, "relu6": 6.0}


def fused_activation(y: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """The fused activation in float: clip at 0 and at its upper bound (relu, relu6)."""
    if activation is None:
        return y
    upper = FUSED_UPPER_BOUND[activation]
    return nn.functional.relu(y) if upper is None else nn.functional.hardtanh(y, 0.0, upper)


class FusedLayer(nn.Module):
    """Float conv/linear -> optional batch norm -> optional relu/relu6, as one module (same float result). A batch
    norm that no conv/linear precedes, with its relu, is FusedLayer(bn, None, activation) (hat/quant/batch_norm.py)."""

    def __init__(self, layer: nn.Module, bn: Optional[nn.Module] = None, activation: Optional[str] = None):
        super().__init__()
        self.layer, self.bn, self.activation = layer, bn, activation

    def forward(self, x):
        x = self.layer(x)
        if self.bn is not None:
            x = self.bn(x)
        return fused_activation(x, self.activation)


def _fusable(modules: Sequence[nn.Module]) -> int:
    """How many of `modules` (from the start) form a fusable pattern: 0, 1 (layer alone), 2 or 3."""
    if modules and type(modules[0]) in STANDALONE_NORMS:  # a batch norm no conv/linear precedes (+ relu/relu6)
        return 2 if len(modules) > 1 and type(modules[1]) in ACTIVATIONS else 1
    if not modules or type(modules[0]) not in WEIGHTED:
        return 0
    count = 1
    if count < len(modules) and type(modules[count]) is NORMS[type(modules[0])]:
        count += 1
    if count < len(modules) and type(modules[count]) in ACTIVATIONS:
        count += 1
    return count


def _fused(modules: Sequence[nn.Module]) -> FusedLayer:
    layer, rest = modules[0], list(modules[1:])
    bn = rest.pop(0) if rest and isinstance(rest[0], (nn.BatchNorm1d, nn.BatchNorm2d)) else None
    if bn is not None and not bn.track_running_stats:
        raise ValueError(f"a {type(bn).__name__} with track_running_stats=False cannot be folded into the deployed "
                         f"{type(layer).__name__}: the device needs fixed statistics; enable running statistics")
    return FusedLayer(layer, bn, ACTIVATIONS[type(rest[0])] if rest else None)


def find_sequential_groups(model: nn.Module) -> list[list[str]]:
    """Dotted names of every layer [+ bn] [+ relu] run inside nn.Sequential containers (the model is unchanged)."""
    groups = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        i = 0
        while i < len(children):
            count = _fusable([m for _, m in children[i:]])
            if count >= 2:
                groups.append([f"{prefix}.{name}" if prefix else name for name, _ in children[i:i + count]])
            i += max(count, 1)
    return groups


def fuse_sequential_patterns(model: nn.Module) -> list[list[str]]:
    """Fuse every group find_sequential_groups finds, in place; returns the groups."""
    groups = find_sequential_groups(model)
    fuse_modules(model, groups)
    return groups


def fuse_modules(model: nn.Module, groups: Sequence[Sequence[str]]) -> nn.Module:
    """Fuse explicitly named groups, e.g. [["conv1", "bn1", "relu1"]], in place; a bad group is an error."""
    named = dict(model.named_modules())
    for group in groups:
        missing = [name for name in group if name not in named]
        if missing:
            raise ValueError(f"fuse_modules: no module named {', '.join(missing)} in {type(model).__name__}")
        modules = [named[name] for name in group]
        if _fusable(modules) != len(modules):
            kinds = " + ".join(type(m).__name__ for m in modules)
            raise ValueError(f"fuse_modules: {kinds} ({', '.join(group)}) is not fusable; supported: Conv2d + "
                             f"BatchNorm2d [+ ReLU/ReLU6], Linear + BatchNorm1d [+ ReLU/ReLU6], Conv2d/Linear + ReLU, "
                             f"BatchNorm2d/BatchNorm1d + ReLU/ReLU6")
        replace_module(model, group[0], _fused(modules))
        for name in group[1:]:
            replace_module(model, name, nn.Identity())
    return model


def replace_module(model: nn.Module, dotted: str, module: nn.Module) -> None:
    """Put `module` at the dotted name `dotted` inside `model`."""
    parent, _, name = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
