"""prepare_qat (eager mode): copy, fuse, resolve qconfigs, swap float modules for QAT modules."""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from hat.quant.fake_quantize import set_fake_quant_state
from hat.quant.float_part import FloatPart
from hat.quant.fuse import find_sequential_groups, fuse_modules, replace_module
from hat.quant.module_table import float_op, qat_op
from hat.quant.qconfig import QConfig, effective_qconfigs, get_default_qat_qconfig
from hat.quant.qtensor import QuantizationError


def prepare_qat(model: nn.Module, qconfig_dict: Optional[dict[str, Any]] = None, inplace: bool = False) -> nn.Module:
    """The QAT version of `model`: layers fused (BN folded), fake quant on weights and outputs, state "qat".

    qconfig_dict None means the default int8 qconfig everywhere. Build the optimizer after this call: the QAT
    model's parameters are the ones to train.
    """
    if qconfig_dict is None:
        qconfig_dict = {"": get_default_qat_qconfig()}
    model = model if inplace else copy_model(model)
    if any(qat_op(m) is not None for m in model.modules()):
        raise QuantizationError("prepare_qat: the model is already prepared; prepare the float model once")
    qconfigs = effective_qconfigs(model, qconfig_dict)
    _refuse_mixed_marches(qconfigs)
    _refuse_subclassed_layers(model, qconfigs)
    groups = find_sequential_groups(model)
    fuse_modules(model, groups)
    fused_away = {name for group in groups for name in group[1:]}  # now nn.Identity: part of the fused layer
    swapped: list[str] = []
    for name, module in list(model.named_modules()):
        if any(name.startswith(prefix + ".") for prefix in swapped):
            continue
        if getattr(module, "hat_constant", False):  # float code on constants (prepare_qat_fx marks it): as it is
            swapped.append(name)
            continue
        if qconfigs.get(name) is None:
            outer = _float_part_qconfig(model, name, module, qconfigs, fused_away)
            if outer is not None:  # an explicit float part inside a quantized module: float in between
                replace_module(model, name, FloatPart(module, outer, name))
                swapped.append(name)
            continue
        op = float_op(module)
        if op is not None:
            qat = op.to_qat(module, qconfigs[name])
            source = getattr(module, "hat_source", None)  # a module prepare_qat_fx made for a user's call
            qat.hat_name = f"{name} ({source})" if source else name
            replace_module(model, name, qat)
            swapped.append(name)
    set_fake_quant_state(model, "qat")
    return model


def _float_part_qconfig(model: nn.Module, name: str, module: nn.Module, qconfigs: dict[str, Optional[QConfig]],
                        fused_away: set[str]) -> Optional[QConfig]:
    """The qconfig of the parent of `name` when `name` is an explicit float part inside a quantized module (qconfig
    None, parent quantized): prepare_qat wraps it in a FloatPart. None for the rest: the root, modules the fusion
    emptied, containers without forward, and the parts outside the deploy model (`NON_DEPLOY`: loss, aux heads),
    which get float inputs and stay exactly as they are."""
    parent = name.rpartition(".")[0]
    if (not name or name not in qconfigs or name in fused_away or name in getattr(model, "NON_DEPLOY", ())
            or isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict))):
        return None
    return qconfigs.get(parent)


def _refuse_mixed_marches(qconfigs: dict[str, Optional[QConfig]]) -> None:
    """One model is one program for one march: its qconfigs must agree on the arithmetic they emulate."""
    marches: dict[str, str] = {}
    for name, qconfig in qconfigs.items():
        if qconfig is not None:
            marches.setdefault(qconfig.march, name or "the model")
    if len(marches) > 1:
        listed = ", ".join(f"'{march}' (e.g. {name})" for march, name in marches.items())
        raise QuantizationError(f"prepare_qat: the qconfigs mix marches {listed}; a model runs on one march: make "
                                f"every qconfig with the same march= (the config's quant.march)")


def _refuse_subclassed_layers(model: nn.Module, qconfigs: dict) -> None:
    """FAQ 2.4 Q4: a subclass of nn.Conv2d/nn.Linear with its own forward would lose that forward's extra ops."""
    for name, module in model.named_modules():
        base = next((b for b in (nn.Conv2d, nn.Linear) if isinstance(module, b)), None)
        if base is None or type(module) is base or qconfigs.get(name) is None:
            continue
        if type(module).forward is not base.forward:
            raise QuantizationError(
                f"module '{name}' ({type(module).__name__}) subclasses nn.{base.__name__} and overrides forward; "
                f"its QAT version would drop the extra ops of that forward. Hold the layer as a submodule instead "
                f"(self.conv = nn.{base.__name__}(...); call self.conv(x) in forward), or give '{name}' qconfig None")


def copy_model(model: nn.Module) -> nn.Module:
    """deepcopy that also works when the model holds non-leaf tensors (FAQ 2.4 Q3): they are copied detached."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)

