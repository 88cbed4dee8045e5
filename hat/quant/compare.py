"""compare: per-layer SQNR and cosine similarity between two versions of a model (float / QAT / quantized).

The tool for "where did my accuracy go": run the same input through both, and find the first layer whose
output drifts. Float models are fused on a copy first, so a conv+bn+relu group is compared at the same point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from hat.quant.fuse import fuse_sequential_patterns
from hat.quant.prepare import copy_model
from hat.quant.qtensor import dequantize


@dataclass
class LayerDiff:
    name: str
    module_a: str
    module_b: str
    sqnr_db: float  # 10 log10(|a|^2 / |a - b|^2); inf when equal
    cosine: float


class CompareReport(list):
    """A list of LayerDiff in execution order; str() is the table."""

    def worst(self, n: int = 5) -> list[LayerDiff]:
        return sorted(self, key=lambda d: d.sqnr_db)[:n]

    def __str__(self) -> str:
        rows = [("layer", "module a", "module b", "SQNR dB", "cosine")]
        rows += [(d.name, d.module_a, d.module_b, f"{d.sqnr_db:.1f}", f"{d.cosine:.5f}") for d in self]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@torch.no_grad()
def compare(model_a: nn.Module, model_b: nn.Module, inputs: Sequence[torch.Tensor]) -> CompareReport:
    """Outputs of every module present (by name) in both models, compared on `inputs` (a tuple of args)."""
    outputs = []
    for model in (model_a, model_b):
        model = copy_model(model).eval()
        fuse_sequential_patterns(model)
        outputs.append(_record(model, inputs))
    report = CompareReport()
    for name, (kind_a, a) in outputs[0].items():
        if name in outputs[1] and outputs[1][name][1].shape == a.shape:
            kind_b, b = outputs[1][name]
            if kind_a == kind_b == "Identity":  # placeholders left by fusion repeat the row above
                continue
            report.append(LayerDiff(name, kind_a, kind_b, _sqnr(a, b), _cosine(a, b)))
    return report


def _record(model: nn.Module, inputs: Sequence[torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    seen: dict[str, tuple[str, torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        def hook(mod, args, output, name=name):
            value = dequantize(output)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                seen[name or "(output)"] = (type(mod).__name__, value.detach().double())
        hooks.append(module.register_forward_hook(hook))
    try:
        model(*inputs)
    finally:
        for handle in hooks:
            handle.remove()
    return seen


def _sqnr(a: torch.Tensor, b: torch.Tensor) -> float:
    noise = float(((a - b) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(float((a ** 2).sum()), 1e-30) / noise)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
