"""Per-layer similarity along the pipeline: float -> QAT -> quantized -> integer program.

Each step is compared with the one before it, layer by layer (the user's module names), over several batches:
float vs QAT shows the quantization noise each layer adds, QAT vs quantized what conversion to integer arithmetic
changes, quantized vs program whether the program is bit-exact (0 LSB) at every layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from hat.quant.compare import LayerDiff, diff_layers, prepare_for_compare, record
from hat.table import format_table

STEPS = (("float", "qat"), ("qat", "quantized"), ("quantized", "program"))


@dataclass
class SimilarityRow:
    layer: str
    kind: str  # the quantized model's module type
    diffs: dict[tuple[str, str], LayerDiff]  # per step; a step is missing when a side has no such layer


class SimilarityReport(list):
    """SimilarityRows in execution order."""

    def header(self) -> list[str]:
        columns = ["layer", "type"]
        for a, b in STEPS:
            columns += [f"cosine {a}-{b}", f"SQNR dB {a}-{b}", f"max err LSB {a}-{b}"]
        return columns

    def rows(self) -> list[list]:
        out = []
        for row in self:
            cells: list = [row.layer, row.kind]
            for step in STEPS:
                d = row.diffs.get(step)
                cells += [d.cosine, d.sqnr_db, d.max_error_lsb] if d else [math.nan] * 3
            out.append(cells)
        return out

    def first_drop(self, min_sqnr_db: float = 20.0) -> Optional[SimilarityRow]:
        """The first layer whose float-vs-QAT SQNR falls below `min_sqnr_db`: where to start looking."""
        return next((r for r in self if ("float", "qat") in r.diffs
                     and r.diffs[("float", "qat")].sqnr_db < min_sqnr_db), None)

    def __str__(self) -> str:
        def cell(row: SimilarityRow, step, what: str) -> str:
            d = row.diffs.get(step)
            if d is None:
                return "-"
            if what == "lsb":
                return "-" if math.isnan(d.max_error_lsb) else f"{d.max_error_lsb:.1f}"
            return f"{d.cosine:.4f}" if what == "cos" else f"{d.sqnr_db:.1f}"

        rows = [["layer", "type", "cos f-q", "SQNR f-q", "LSB f-q", "SQNR q-int", "LSB q-int", "LSB int-prog"]]
        for r in self:
            rows.append([r.layer, r.kind, cell(r, STEPS[0], "cos"), cell(r, STEPS[0], "sqnr"),
                         cell(r, STEPS[0], "lsb"), cell(r, STEPS[1], "sqnr"), cell(r, STEPS[1], "lsb"),
                         cell(r, STEPS[2], "lsb")])
        legend = ("f-q: float vs QAT (fake quant); q-int: QAT vs quantized model; int-prog: quantized model vs "
                  "integer program (0: bit-exact). SQNR in dB (inf: equal), max error in steps of the layer's "
                  "output grid")
        drop = self.first_drop()
        hint = (f"first layer under 20 dB float-vs-QAT: {drop.layer} ({drop.kind})" if drop
                else "every layer keeps >= 20 dB float-vs-QAT")
        return "\n".join([format_table(rows), legend, hint])


def layer_similarity(float_model: nn.Module, qat_model: nn.Module, quantized_model: nn.Module,
                     program, batches: Iterable[torch.Tensor]) -> SimilarityReport:
    """Compare the deploy parts `float_model`, `qat_model`, `quantized_model` and the integer `program` (or None)
    layer by layer on each batch of images in `batches`."""
    models = {"float": prepare_for_compare(float_model), "qat": prepare_for_compare(qat_model),
              "quantized": prepare_for_compare(quantized_model)}
    recordings: dict[tuple[str, str], list] = {step: [] for step in STEPS}
    order: dict[str, str] = {}
    for images in batches:
        seen = {name: record(model, (images,)) for name, model in models.items()}
        if program is not None:
            seen["program"] = program.module_outputs(images)
        for name, found in seen["quantized"].items():
            if name not in seen["quantized"].aliases:
                order.setdefault(name, found.kind)
        for a, b in STEPS:
            if b in seen:
                recordings[(a, b)].append((seen[a], seen[b]))
    per_step = {step: {d.name: d for d in diff_layers(pairs)} for step, pairs in recordings.items()}
    return SimilarityReport(SimilarityRow(name, kind, {step: per_step[step][name] for step in STEPS
                                                       if name in per_step[step]})
                            for name, kind in order.items())
