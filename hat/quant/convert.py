"""convert: a QAT model -> the quantized model (integer weights and the march's integer arithmetic)."""
from __future__ import annotations

from torch import nn

from hat.quant.fake_quantize import FakeQuantize, LSQFakeQuantize, PACTFakeQuantize
from hat.quant.fuse import replace_module
from hat.quant.module_table import qat_op
from hat.quant.prepare import copy_model
from hat.quant.qtensor import QuantizationError


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
        op = qat_op(module)
        if op is not None:
            quantized = op.to_quantized(module)
            if not name:
                raise ValueError("convert: the model itself is a QAT layer; convert the model that contains it")
            quantized.hat_name = getattr(module, "hat_name", "") or name
            replace_module(model, name, quantized)
            swapped.append(name)
    return model.eval()

