"""ONNX translations of the hat:: ops that have a standard ONNX form, for torch.onnx.export(dynamo=True).

Fake quant (straight-through and LSQ, which compute the same forward) becomes QuantizeLinear -> DequantizeLinear,
per tensor or per axis, int8 or int16, zero point 0. ONNX rounds half to even where J5 rounds half up: values on
an exact .5 tie land one step apart (the J5 integer program, not ONNX, is what deploys).
The integer grid sample and J5 requantize have no standard ONNX op with their semantics and are not translated;
`hat.quant.functional.grid_sample` on float/QAT tensors already exports as ONNX GridSample.

    torch.onnx.export(model, args, dynamo=True, custom_translation_table=onnx_translations())
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

OPSET = 21  # every ONNX file hat writes: int16 QuantizeLinear/DequantizeLinear need 21
ONNX_INT8, ONNX_INT16 = 3, 5  # TensorProto element types of the zero point (it sets the integer type)


def onnx_translations() -> dict[Callable, Callable]:
    """The custom_translation_table for torch.onnx.export(dynamo=True); needs onnxscript."""
    try:
        from onnxscript import opset21 as op
    except ImportError:
        raise ImportError("exporting hat ops to ONNX needs onnxscript: pip install onnx onnxscript") from None

    def fake_quant(x, scale, axis: Optional[int] = None, qmin: int = -128, qmax: int = 127, half_up: bool = True):
        zero = op.Cast(op.Mul(scale, op.Constant(value_float=0.0)), to=ONNX_INT8 if qmin >= -128 else ONNX_INT16)
        if axis is None:
            return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale, zero)
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero, axis=axis), scale, zero, axis=axis)

    def fake_quant_with_mask(x, scale, axis: Optional[int] = None, qmin: int = -128, qmax: int = 127,
                             half_up: bool = True):
        out = fake_quant(x, scale, axis, qmin, qmax, half_up)
        return out, op.Equal(out, out)  # the gradient mask: unused by inference, present to match the schema

    def lsq(x, scale, axis: Optional[int] = None, qmin: int = -128, qmax: int = 127, half_up: bool = True,
            grad_factor: float = 1.0):
        return fake_quant(x, scale, axis, qmin, qmax, half_up)

    hat = torch.ops.hat
    return {hat.fake_quant_autograd.default: fake_quant, hat.fake_quant.default: fake_quant_with_mask,
            hat.lsq_fake_quant_autograd.default: lsq, hat.lsq_fake_quant.default: fake_quant}
