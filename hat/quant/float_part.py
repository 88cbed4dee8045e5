"""FloatPart: a module kept in float inside a quantized model (`quant.float_modules`, a qconfig None entry).

prepare_qat wraps each module whose qconfig is None while its parent has one. In calibration and QAT the part
runs in float: its QTensor inputs are dequantized (the DeQuantStub path, so a trace sees a `dequantize`), the float
module runs, and its floating-point outputs are quantized again by the part's own QuantStub, which observes their
range with the parent's qconfig (convert turns it into a QuantizedQuantStub). The model trains, evaluates and runs
converted with that part in float; it cannot be compiled: the checker names the part.

Called with float inputs only (the part sits outside the quantized region, e.g. before the model's QuantStub) it
runs the float module and returns its output unchanged.

State dict: the wrapped module's parameters and buffers move one level down, under `module`
(`backbone.1.conv1.0.weight` -> `backbone.1.conv1.module.0.weight`), and the output quant adds
`backbone.1.conv1.quant.activation_post_process.*`. prepare_qat is what wraps, so float checkpoints (loaded
before prepare) keep their keys; only checkpoints of the prepared model (calibration, QAT) have the new ones.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from hat.quant.qat import QATQuantStub
from hat.quant.qconfig import QConfig
from hat.quant.qtensor import NamedQuantModule, QTensor, QuantizationError, dequantize_output


class FloatPart(NamedQuantModule):
    """`module` run in float between a dequantize of its QTensor inputs and a quantize (observed with `qconfig`,
    the surrounding qconfig) of its outputs. `hat_name` is the part's name in the model prepare_qat was given."""

    def __init__(self, module: nn.Module, qconfig: QConfig, name: str = ""):
        super().__init__()
        if qconfig.activation is None:
            raise QuantizationError(
                f"float module '{name or type(module).__name__}' sits in a module with a high-precision (qint32) "
                f"qconfig: its float output cannot be quantized again. Give the enclosing module an int8/int16 "
                f"qconfig, or keep the enclosing module in float instead")
        self.module = module
        self.quant = QATQuantStub(qconfig)
        self.hat_name = name
        self.quant.hat_name = f"{name}.quant" if name else ""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not any(isinstance(x, QTensor) for x in tree_flatten((args, kwargs))[0]):
            out = self.module(*args, **kwargs)
            self._observe_unused(out)
            return out
        args, kwargs = tree_map(self._dequantize, (args, kwargs))
        return tree_map(self._quantize, self.module(*args, **kwargs))

    def _dequantize(self, x: Any) -> Any:
        return dequantize_output(x, self.hat_name) if isinstance(x, QTensor) else x

    def _quantize(self, y: Any) -> Any:
        return self.quant(y) if isinstance(y, torch.Tensor) and y.is_floating_point() else y

    def _observe_unused(self, out: Any) -> None:
        """Float in, float out: the output quant is not used, but it still observes (without gradients) so that
        convert does not refuse it as never calibrated."""
        if isinstance(self.quant, QATQuantStub):
            with torch.no_grad():
                tree_map(self._quantize, out)

    def extra_repr(self) -> str:
        return f"float part '{self.hat_name}'" if self.hat_name else "float part"
