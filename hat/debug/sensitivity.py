"""Sensitivity analysis: which quantized layers cost the most accuracy.

Each layer of the QAT model in turn is given more precision (its fake quants off: float; or its output on the
int16 grid: int16) while every other layer stays as trained, and the validation metric is measured. The layers
whose extra precision recovers the most come first, and the top ones are the suggested `quant.int16_modules` (or
`quant.float_modules`) list.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from hat.quant.fake_quantize import FakeQuantize, simulated_dtype
from hat.table import format_table

PRECISIONS = ("int16", "float")
CONFIG_KEYS = {"int16": "quant.int16_modules", "float": "quant.float_modules"}


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of a QAT model that own fake quants (stubs, convs, linears, adds, ...), by name, in order."""
    return [(name, module) for name, module in model.named_modules()
            if not isinstance(module, FakeQuantize) and any(isinstance(c, FakeQuantize) for c in module.children())]


def can_raise(module: nn.Module, precision: str) -> bool:
    """Whether `precision` adds anything to `module`: int16 only helps an int8 output."""
    if precision == "float":
        return True
    output = getattr(module, "activation_post_process", None)
    return isinstance(output, FakeQuantize) and output.dtype == "qint8"


@contextlib.contextmanager
def layer_precision(module: nn.Module, precision: str) -> Iterator[None]:
    """`module` computes at `precision` until the block ends: float (its fake quants off) or int16 (its output
    on the int16 grid over the same range; weights stay int8, as with quant.int16_modules)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    with contextlib.ExitStack() as stack:
        if precision == "int16":
            if can_raise(module, precision):
                stack.enter_context(simulated_dtype(module.activation_post_process, "qint16"))
        else:
            for child in module.children():
                if isinstance(child, FakeQuantize):
                    saved = child.fake_quant_enabled.clone()
                    child.fake_quant_enabled.fill_(0)
                    stack.callback(child.fake_quant_enabled.copy_, saved)
        yield


@dataclass
class LayerSensitivity:
    name: str
    kind: str
    metrics: dict[str, float]  # with this layer at the higher precision, every other layer quantized


@dataclass
class SensitivityReport:
    precision: str
    metric: str
    higher_is_better: bool
    float_metrics: dict[str, float]
    quantized_metrics: dict[str, float]  # every layer quantized (the QAT model as trained)
    layers: list[LayerSensitivity]  # most sensitive first

    def gain(self, layer: LayerSensitivity) -> float:
        """How much better the metric is with the layer at higher precision (positive: it helps)."""
        change = layer.metrics[self.metric] - self.quantized_metrics[self.metric]
        return change if self.higher_is_better else -change

    def suggested(self, count: int = 3) -> list[str]:
        """The first `count` layers whose higher precision improves the metric."""
        return [layer.name for layer in self.layers if self.gain(layer) > 0][:count]

    def header(self) -> list[str]:
        return ["rank", "layer", "type", self.metric, "gain", "val/loss"]

    def rows(self) -> list[list]:
        return [[i + 1, layer.name, layer.kind, layer.metrics[self.metric], self.gain(layer),
                 layer.metrics.get("val/loss", float("nan"))] for i, layer in enumerate(self.layers)]

    def text(self, suggest: int = 3) -> str:
        """The ranking table, with the suggested config list of the first `suggest` helpful layers."""
        rows = [self.header()] + [[r[0], r[1], r[2], f"{r[3]:.4g}", f"{r[4]:+.4g}", f"{r[5]:.4g}"]
                                  for r in self.rows()]
        lines = [f"sensitivity: {self.metric} with one layer at {self.precision}, every other layer quantized "
                 f"(float model {self.float_metrics[self.metric]:.4g}, all quantized "
                 f"{self.quantized_metrics[self.metric]:.4g})", format_table(rows)]
        chosen = self.suggested(suggest)
        lost = self.float_metrics[self.metric] - self.quantized_metrics[self.metric]
        if (lost if self.higher_is_better else -lost) <= 0:
            lines.append(f"the quantized model loses no {self.metric} against the float one on these batches: "
                         f"nothing to recover (measure on more with --batches)")
        elif chosen:
            lines.append(f"suggested: {CONFIG_KEYS[self.precision]}=[{','.join(chosen)}]  (the "
                         f"{len(chosen)} layer(s) whose {self.precision} recovers the most {self.metric})")
        else:
            lines.append(f"no single layer at {self.precision} improves {self.metric}: the loss of accuracy is "
                         f"spread over many layers (try quant.activation_dtype=qint16, or more QAT)")
        return "\n".join(lines)

    __str__ = text


def sensitivity(qat_model: nn.Module, float_model: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]],
                metric: str, higher_is_better: bool = True, precision: str = "int16",
                layers: Sequence[str] = ()) -> SensitivityReport:
    """Rank the quantized layers of `qat_model` (fake quant in validation state) by the `metric` that
    `evaluate(model)` gives with each one alone at `precision`; `layers` limits which (default: all)."""
    candidates = [(n, m) for n, m in quantized_layers(qat_model) if can_raise(m, precision)
                  and (not layers or n in layers)]
    with torch.no_grad():
        reference, quantized = evaluate(float_model), evaluate(qat_model)
        if metric not in quantized:
            raise ValueError(f"metric '{metric}' is not among the evaluated ones ({', '.join(quantized)})")
        results = []
        for name, module in candidates:
            with layer_precision(module, precision):
                results.append(LayerSensitivity(name, type(module).__name__, evaluate(qat_model)))
    report = SensitivityReport(precision, metric, higher_is_better, reference, quantized, [])
    loss = "val/loss"
    report.layers = sorted(results, key=lambda r: (-report.gain(r), r.metrics.get(loss, 0.0)))
    return report
