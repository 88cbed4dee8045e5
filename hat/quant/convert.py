"""convert: a QAT model -> the quantized model (integer weights and J5 integer arithmetic)."""
from __future__ import annotations

from torch import nn

from hat.quant import elementwise
from hat.quant.fake_quantize import FakeQuantize, LSQFakeQuantize, PACTFakeQuantize
from hat.quant.qtensor import QuantizationError

from hat.quant.fuse import replace_module
from hat.quant.prepare import copy_model
from hat.quant.qat import QATConv2d, QATDeQuantStub, QATFloatFunctional, QATQuantStub, _QATWeighted
from hat.quant.quantized import (QuantizedConv2d, QuantizedDeQuantStub, QuantizedFloatFunctional, QuantizedLinear,
                                 QuantizedQuantStub)


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Swap every QAT module for its quantized version, in eval mode. Run the result on float input: its
    QuantStub quantizes, its DeQuantStub returns float; in between everything is integer."""
    model = model if inplace else copy_model(model)
    never = [name for name, m in model.named_modules()
             if isinstance(m, FakeQuantize) and not isinstance(m, (LSQFakeQuantize, PACTFakeQuantize))
             and not m.activation_post_process.observed]
    if never:
        raise QuantizationError(f"convert: {', '.join(never[:5])} never observed data, so its scale is a "
                                f"placeholder; calibrate first (set_fake_quant_state(model, 'calibration') and run "
                                f"batches, or tools/train.py --stage calibration)")
    swapped: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(prefix + ".") for prefix in swapped):
            continue
        quantized = _quantized_module(module)
        if quantized is not None:
            if not name:
                raise ValueError("convert: the model itself is a QAT layer; convert the model that contains it")
            quantized.hat_name = getattr(module, "hat_name", "") or name
            replace_module(model, name, quantized)
            swapped.append(name)
    return model.eval()


def _quantized_module(module: nn.Module):
    if isinstance(module, QATQuantStub):
        fq = module.activation_post_process
        return QuantizedQuantStub(fq.current_scale(), fq.dtype)
    if isinstance(module, QATDeQuantStub):
        return QuantizedDeQuantStub()
    if isinstance(module, QATFloatFunctional):
        fq = module.activation_post_process
        return QuantizedFloatFunctional(fq.current_scale(), fq.dtype)
    if isinstance(module, _QATWeighted):
        weight, bias = module.deploy_weight_and_bias()
        fq = module.activation_post_process
        cls = QuantizedConv2d if isinstance(module, QATConv2d) else QuantizedLinear
        out_scale, out_dtype = (fq.current_scale(), fq.dtype) if fq is not None else (None, "qint32")
        return cls(module.layer, weight, bias, module.weight_fake_quant.current_scale(), out_scale, out_dtype,
                   module.activation)
    return elementwise.quantized_module(module)
