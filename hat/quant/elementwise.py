"""Nonlinear element-wise ops (sigmoid, tanh, SiLU, GELU, exp, ...) in the three stages, read from the op table.

float:     `ElementwiseOp(name, **arguments)`, what prepare_qat_fx puts in place of `torch.sigmoid(x)` & co.; the
           nn modules of the table (nn.Sigmoid, nn.SiLU, nn.GELU, ...) are taken as they are.
QAT:       `QATElementwise`: f in float on the dequantized input, output fake-quantized (observed scale).
quantized: `QuantizedElementwise`: one look-up-table kernel; its tables are built in float64 from f, the input's
           and the output's scales (hat/integer/lut.py): an exact 256-entry table for an int8 input, segmented
           int16 tables otherwise. The program stores the tables, so program and model are bit-exact.
Not fused into a conv: J5's conv output stage applies relu/relu6 only; any other activation is its own table op
on the conv's requantized output.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from hat.integer import lut
from hat.integer.profile import Profile
from hat.quant.optable import BY_NAME, OPS, Elementwise, gelu_entry
from hat.quant.qat import _Named
from hat.quant.qconfig import QConfig
from hat.quant.qtensor import NamedQuantModule, QTensor, QuantizationError, apply

_MODULES: dict[type, Elementwise] = {cls: op for op in OPS for cls in op.modules}


class ElementwiseOp(nn.Module):
    """Float module computing table op `name` (e.g. ElementwiseOp("exp")): a place for QAT to observe its output."""

    def __init__(self, name: str, **arguments: Any):
        super().__init__()
        if name not in BY_NAME:
            raise ValueError(f"unknown element-wise op '{name}'; the table has {', '.join(BY_NAME)}")
        self.name, self.arguments = name, {**BY_NAME[name].arguments, **arguments}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return BY_NAME[self.name](x, **self.arguments)

    def extra_repr(self) -> str:
        return ", ".join([repr(self.name), *(f"{k}={v!r}" for k, v in self.arguments.items())])


def table_op(module: nn.Module) -> Optional[tuple[Elementwise, dict[str, Any]]]:
    """(table entry, arguments) when `module` is an element-wise op of the table, else None."""
    if isinstance(module, ElementwiseOp):
        return BY_NAME[module.name], dict(module.arguments)
    if isinstance(module, nn.GELU):
        return gelu_entry(module.approximate), {}
    op = _MODULES.get(type(module))
    return (op, op.module_arguments(module)) if op is not None else None


class QATElementwise(_Named):
    """f on the dequantized input in float, its output fake-quantized: QAT tracks the table convert will build."""

    def __init__(self, op: Elementwise, arguments: dict[str, Any], qconfig: QConfig):
        super().__init__()
        if qconfig.activation is None:
            raise QuantizationError(f"{op.name}: a table op needs an int8/int16 output qconfig, not a "
                                    f"high-precision one")
        self._use_qconfig(qconfig)
        self.op, self.arguments = op, arguments
        self.activation_post_process = qconfig.activation()

    def forward(self, x) -> QTensor:
        return self._output(self.activation_post_process, self.op(self._input(x), **self.arguments))

    def extra_repr(self) -> str:
        return self.op.name


class QuantizedElementwise(NamedQuantModule):
    """One look-up-table kernel; the tables for an input scale are built once (float64) and reused."""

    def __init__(self, op: Elementwise, arguments: dict[str, Any], out_scale: torch.Tensor, out_dtype: str,
                 profile: Profile):
        super().__init__()
        self.op, self.arguments, self.out_dtype, self.profile = op, arguments, out_dtype, profile
        self.register_buffer("out_scale", out_scale.detach().clone().reshape(1))
        self._tables: dict[tuple[float, str], tuple[str, dict]] = {}

    def forward(self, x) -> QTensor:
        (x,) = self._qinputs(x)
        kernel, params = self.kernel_params(float(x.scale), x.dtype)
        return apply(kernel, [x], params, self.out_scale, self.out_dtype, self.hat_name)

    def kernel_params(self, in_scale: float, in_dtype: str) -> tuple[str, dict]:
        """(kernel, parameters) of this op for an input of `in_scale` and `in_dtype`."""
        key = (in_scale, in_dtype)
        if key not in self._tables:
            self._tables[key] = build_tables(self.op, self.arguments, in_scale, in_dtype, float(self.out_scale),
                                             self.out_dtype, self.profile)
        return self._tables[key]

    def extra_repr(self) -> str:
        return f"{self.op.name}, out={self.out_dtype}, scale={float(self.out_scale):.6g}"


def build_tables(op: Elementwise, arguments: dict[str, Any], in_scale: float, in_dtype: str, out_scale: float,
                 out_dtype: str, profile: Profile) -> tuple[str, dict]:
    """The integer form of f for these scales on `profile`: the exact table of an int8 input, else segmented
    tables."""
    fn = lambda x: op(x, **arguments)  # noqa: E731
    if in_dtype == "qint8":
        return "lookup", {"table": lut.exact_table(fn, in_scale, in_dtype, out_scale, out_dtype, profile),
                          "out_dtype": out_dtype}
    return "segment_lookup", lut.segment_table(fn, in_scale, in_dtype, out_scale, out_dtype, odd=op.odd,
                                               profile=profile)


def qat_module(module: nn.Module, qconfig: QConfig) -> Optional[QATElementwise]:
    found = table_op(module)
    return QATElementwise(found[0], found[1], qconfig) if found is not None else None


def quantized_module(module: nn.Module) -> Optional[QuantizedElementwise]:
    if not isinstance(module, QATElementwise):
        return None
    fake_quant = module.activation_post_process
    return QuantizedElementwise(module.op, module.arguments, fake_quant.current_scale(), fake_quant.dtype,
                                module.profile)
