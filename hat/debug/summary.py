"""Model summary: per layer, the output shape and size, the parameters and the multiply-accumulates (MACs).

MACs come from torch.utils.flop_counter (FLOPs / 2) on one image; the largest activations and the layers with
the most MACs are where an accelerator's memory and time go.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hat.table import format_table


@dataclass
class LayerSummary:
    name: str
    kind: str
    output_shape: list[int]  # for one image
    output_elements: int
    params: int
    macs: int


class ModelSummary(list):
    """LayerSummaries of the leaf modules that ran, in execution order."""

    header = ["layer", "type", "output shape", "output elements", "params", "MACs"]

    def rows(self) -> list[list]:
        return [[s.name, s.kind, "x".join(map(str, s.output_shape)), s.output_elements, s.params, s.macs]
                for s in self]

    def __str__(self) -> str:
        rows = [self.header] + [[*r[:3], f"{r[3]:,}", f"{r[4]:,}", f"{r[5]:,}"] for r in self.rows()]
        largest = max(self, key=lambda s: s.output_elements, default=None)
        total = (f"total: {sum(s.params for s in self):,} parameters, {sum(s.macs for s in self) / 1e6:.3f} MMAC "
                 f"per image" + (f"; largest activation {largest.output_elements:,} elements ({largest.name})"
                                 if largest else ""))
        return f"{format_table(rows)}\n{total}"


@torch.no_grad()
def model_summary(model: nn.Module, example: torch.Tensor) -> ModelSummary:
    """Run `model` (eval) on the first image of `example` and summarise each leaf module."""
    outputs: dict[str, tuple[str, torch.Tensor]] = {}
    leaves = [(name, m) for name, m in model.named_modules() if name and not list(m.children())]

    def remember(name: str):
        def hook(module, args, output) -> None:
            outputs.setdefault(name, (type(module).__name__, output))
        return hook

    hooks = [m.register_forward_hook(remember(name)) for name, m in leaves]
    was_training = model.training
    try:
        with FlopCounterMode(display=False) as counter:
            model.eval()(example[:1])
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()
    root = type(model).__name__ + "."
    flops = {key[len(root):]: sum(counts.values()) for key, counts in counter.get_flop_counts().items()
             if key.startswith(root)}
    params = dict(leaves)
    summary = ModelSummary()
    for name, (kind, out) in outputs.items():
        shape = list(out.shape[1:]) if isinstance(out, torch.Tensor) else []
        summary.append(LayerSummary(name, kind, shape, int(torch.Size(shape).numel()) if shape else 0,
                                    sum(p.numel() for p in params[name].parameters()), int(flops.get(name, 0)) // 2))
    return summary
