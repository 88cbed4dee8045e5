"""compare: per-layer SQNR, cosine similarity and max error (in grid steps) between two versions of a model.

The tool for "where did my accuracy go": run the same input through both, and find the first layer whose
output drifts. Float models are fused on a copy first, so a conv+bn+relu group is compared at the same point.
Layers are named as in `model.named_modules()` (a deploy part of the zoo's structures keeps the full model's
names: `backbone.1.conv`), and several batches accumulate into one number per layer (`LayerStats`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from hat.integer.kernels import along_axis
from hat.quant.fake_quantize import FakeQuantize
from hat.quant.fuse import fuse_sequential_patterns
from hat.quant.observer import MinMaxObserver
from hat.quant.prepare import copy_model
from hat.quant.qtensor import QTensor
from hat.table import format_table


@dataclass
class Recorded:
    """One module's output: its type, the values as float64 and, when quantized, its scale (and channel axis)."""

    kind: str
    value: torch.Tensor
    scale: Optional[torch.Tensor] = None
    axis: int = 1


@dataclass
class LayerDiff:
    name: str
    module_a: str
    module_b: str
    sqnr_db: float  # 10 log10(|a|^2 / |a - b|^2); inf when equal
    cosine: float
    max_error_lsb: float = math.nan  # max |a - b| in steps of b's grid (else a's); nan when both are float


class CompareReport(list):
    """A list of LayerDiff in execution order; str() is the table."""

    def worst(self, n: int = 5) -> list[LayerDiff]:
        return sorted(self, key=lambda d: d.sqnr_db)[:n]

    def __str__(self) -> str:
        rows = [("layer", "module a", "module b", "SQNR dB", "cosine", "max err LSB")]
        rows += [(d.name, d.module_a, d.module_b, f"{d.sqnr_db:.1f}", f"{d.cosine:.5f}", f"{d.max_error_lsb:.2f}")
                 for d in self]
        return format_table(rows)


@dataclass
class LayerStats:
    """Sums over batches for one layer pair, so that the SQNR and cosine are those of all batches together."""

    kinds: tuple[str, str]
    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    norm_b: float = 0.0
    max_lsb: float = field(default=math.nan)

    def add(self, a: Recorded, b: Recorded) -> None:
        self.signal += float((a.value ** 2).sum())
        self.noise += float(((a.value - b.value) ** 2).sum())
        self.dot += float((a.value * b.value).sum())
        self.norm_b += float((b.value ** 2).sum())
        grid = b if b.scale is not None else a
        if grid.scale is not None:
            scale = along_axis(grid.scale.double(), a.value, grid.axis) if grid.scale.numel() > 1 else grid.scale
            lsb = float(((a.value - b.value).abs() / scale.double()).max()) if a.value.numel() else 0.0
            self.max_lsb = lsb if math.isnan(self.max_lsb) else max(self.max_lsb, lsb)

    def diff(self, name: str) -> LayerDiff:
        sqnr = math.inf if self.noise == 0 else 10 * math.log10(max(self.signal, 1e-30) / self.noise)
        cosine = self.dot / max(math.sqrt(self.signal * self.norm_b), 1e-30)
        return LayerDiff(name, *self.kinds, sqnr, cosine, self.max_lsb)


def prepare_for_compare(model: nn.Module) -> nn.Module:
    """A fused eval copy of `model`, whose modules line up with a QAT/quantized model's by name."""
    model = copy_model(model).eval()
    fuse_sequential_patterns(model)
    return model


class Recording(dict):
    """Recorded outputs by module name, in execution order. `aliases` are containers that returned a child's output
    unchanged (recorded under both names): a fused float `conv2` (conv + bn) then lines up with a QAT `conv2`."""

    def __init__(self) -> None:
        super().__init__()
        self.aliases: set[str] = set()


@torch.no_grad()
def record(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Recording:
    """The output of every module of `model` on `inputs` (a tuple of args), by name, in execution order. A module
    returning its input (an Identity left by fusion) is skipped; an in-place one (ReLU(inplace=True)) is recorded."""
    seen = Recording()
    last: list = [None, None]  # the latest recorded output and its name
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (FakeQuantize, MinMaxObserver)):
            continue

        def hook(mod, args, output, name=name or "(output)"):
            if isinstance(mod, nn.Identity) and args and output is args[0]:
                return
            if output is last[0] and not getattr(mod, "inplace", False):
                if next(mod.children(), None) is not None and last[1] in seen:
                    seen[name] = replace(seen[last[1]], kind=type(mod).__name__)
                    seen.aliases.add(name)
                return  # a container repeating its last child, or a pass-through such as a float DeQuantStub
            found = _recorded(type(mod).__name__, output)
            if found is not None:
                seen[name] = found
                last[:] = [output, name]
        hooks.append(module.register_forward_hook(hook))
    try:
        model(*inputs)
    finally:
        for handle in hooks:
            handle.remove()
    return seen


def _recorded(kind: str, output) -> Optional[Recorded]:
    if isinstance(output, QTensor):
        return Recorded(kind, output.dequantize().detach().double(), output.scale.detach(), output.axis)
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return Recorded(kind, output.detach().to(torch.float64, copy=True))  # a later in-place op must not change it
    return None


def diff_layers(batches: Iterable[tuple[dict[str, Recorded], dict[str, Recorded]]]) -> CompareReport:
    """Per layer present in both recordings (by name, same shape), over every batch's pair of recordings; in the
    first recording's order. A name that is an alias on both sides is its child's row already and is left out."""
    stats: dict[str, LayerStats] = {}
    for recorded_a, recorded_b in batches:
        both_aliases = getattr(recorded_a, "aliases", set()) & getattr(recorded_b, "aliases", set())
        for name, a in recorded_a.items():
            b = recorded_b.get(name)
            if b is not None and b.value.shape == a.value.shape and name not in both_aliases:
                stats.setdefault(name, LayerStats((a.kind, b.kind))).add(a, b)
    return CompareReport(s.diff(name) for name, s in stats.items())


@torch.no_grad()
def compare(model_a: nn.Module, model_b: nn.Module, inputs: Sequence[torch.Tensor]) -> CompareReport:
    """Outputs of every module present (by name) in both models, compared on `inputs` (a tuple of args)."""
    a, b = prepare_for_compare(model_a), prepare_for_compare(model_b)
    return diff_layers([(record(a, inputs), record(b, inputs))])
