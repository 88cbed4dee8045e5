"""QConfig: how a module's output activation and weight are fake-quantized, and `qconfig_dict` resolution.

`qconfig_dict = {"": global, "module_type": [(nn.Conv2d, qc)], "module_name": [("head.fc", qc)]}`;
priority: global < inherited from the parent < module_type < module_name < a `qconfig` attribute on the module.
A None qconfig keeps the module (and what inherits from it) float.
"""
from __future__ import annotations

import difflib
import functools
from typing import Any, Callable, NamedTuple, Optional

from torch import nn

from hat.quant.fake_quantize import FakeQuantize, LSQFakeQuantize, PACTFakeQuantize
from hat.quant.fuse import FusedLayer, find_sequential_groups
from hat.integer.profile import get_profile
from hat.quant.march import get_march
from hat.quant.observer import MinMaxObserver, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
from hat.table import format_table

ALGORITHMS = ("fake_quant", "lsq", "pact")


class QConfig(NamedTuple):
    """Factories for the output-activation and the weight fake quant (activation None = high-precision output),
    and the march whose arithmetic they emulate: prepare_qat hands it to every module."""

    activation: Optional[Callable[[], nn.Module]]
    weight: Optional[Callable[[], nn.Module]]
    march: str = "bayes"

    def describe(self) -> tuple[str, str]:
        """(activation, weight) as shown in reports: a dtype, or 'qint32 (high precision)'."""
        activation = self.activation.keywords["dtype"] if self.activation else "qint32 (high precision)"
        return activation, self.weight.keywords["dtype"] if self.weight else "float"


def _check(value: str, allowed: tuple[str, ...], what: str, march: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)} on march '{march}', got '{value}'")


def _weight_fake_quant(weight_dtype: str, algorithm: str, march: str) -> Callable[[], nn.Module]:
    _check(weight_dtype, (get_profile(march).weight_dtype,), "weight_dtype", march)
    cls = LSQFakeQuantize if algorithm == "lsq" else FakeQuantize
    # averaging_constant 1: the weight's scale always follows the current weights
    return functools.partial(cls, MovingAveragePerChannelMinMaxObserver, dtype=weight_dtype, ch_axis=0,
                             averaging_constant=1.0, march=march)


def get_default_qat_qconfig(activation_dtype: str = "qint8", weight_dtype: str = "qint8",
                            algorithm: str = "fake_quant", averaging_constant: float = 0.01,
                            march: Optional[str] = None) -> QConfig:
    """int8 (or int16) per-tensor symmetric activations, int8 per-channel symmetric weights, for `march`
    (default: quant.get_march()).

    algorithm: "fake_quant" (observer ranges, straight-through), "lsq" (learned scales), "pact" (learned
    activation clip; weights as fake_quant).
    """
    march = march or get_march()
    _check(activation_dtype, get_profile(march).activation_dtypes, "activation_dtype", march)
    _check(algorithm, ALGORITHMS, "algorithm", march)
    if algorithm == "fake_quant":
        activation = functools.partial(FakeQuantize, MovingAverageMinMaxObserver, dtype=activation_dtype,
                                       averaging_constant=averaging_constant, march=march)
    elif algorithm == "lsq":
        activation = functools.partial(LSQFakeQuantize, MinMaxObserver, dtype=activation_dtype, march=march)
    else:
        activation = functools.partial(PACTFakeQuantize, MinMaxObserver, dtype=activation_dtype, march=march)
    return QConfig(activation, _weight_fake_quant(weight_dtype, algorithm, march), march)


def get_default_qat_out_qconfig(weight_dtype: str = "qint8", algorithm: str = "fake_quant",
                                march: Optional[str] = None) -> QConfig:
    """For a conv/linear whose only consumer is the model output: int8 weights, int32 output (no activation
    fake quant), as J5 allows."""
    march = march or get_march()
    _check(algorithm, ALGORITHMS, "algorithm", march)
    return QConfig(None, _weight_fake_quant(weight_dtype, algorithm, march), march)


QCONFIG_DICT_KEYS = ("", "module_type", "module_name")


def resolve_qconfigs(model: nn.Module, qconfig_dict: Optional[dict[str, Any]]) -> dict[str, Optional[QConfig]]:
    """The qconfig of every named module (root is ""), after priority and inheritance; bad entries raise."""
    qconfig_dict = dict(qconfig_dict or {})
    unknown = [k for k in qconfig_dict if k not in QCONFIG_DICT_KEYS]
    if unknown:
        raise ValueError(f"qconfig_dict: unknown key(s) {', '.join(map(repr, unknown))}; allowed: "
                         f"'' (global), 'module_type', 'module_name'")
    _check_qconfig(qconfig_dict.get(""), "qconfig_dict['']")
    names = [name for name, _ in model.named_modules() if name]
    by_type = dict(_pairs(qconfig_dict, "module_type", _check_type, names))
    by_name = dict(_pairs(qconfig_dict, "module_name", check_module_name, names))
    resolved: dict[str, Optional[QConfig]] = {}
    for name, module in model.named_modules():
        parent = resolved[name.rpartition(".")[0]] if name else qconfig_dict.get("")
        kind = type(module.layer) if isinstance(module, FusedLayer) else type(module)  # a fused conv is a conv
        qconfig = by_type.get(kind, parent)
        qconfig = by_name.get(name, qconfig)
        resolved[name] = getattr(module, "qconfig", qconfig)
    return resolved


def effective_qconfigs(model: nn.Module, qconfig_dict: dict[str, Any]) -> dict[str, Optional[QConfig]]:
    """The qconfig each module ends up with: resolved on the model as written (types and names the user knows),
    then one per fused group: the layer's, unless a later member (bn, relu) is named explicitly."""
    qconfigs = resolve_qconfigs(model, qconfig_dict)
    named = {name for name, _ in qconfig_dict.get("module_name") or []}
    for group in find_sequential_groups(model):
        chosen = next((n for n in reversed(group) if n in named), group[0])
        for name in group:
            qconfigs[name] = qconfigs[chosen]
    return qconfigs


def _pairs(qconfig_dict: dict, key: str, check: Callable, names: list[str]) -> list[tuple[Any, Any]]:
    entries = qconfig_dict.get(key) or []
    pairs = []
    for index, entry in enumerate(entries):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ValueError(f"qconfig_dict['{key}'][{index}] must be a (target, qconfig) pair, got {entry!r}")
        check(entry[0], f"qconfig_dict['{key}'][{index}]", names)
        _check_qconfig(entry[1], f"qconfig_dict['{key}'][{index}]")
        pairs.append(tuple(entry))
    return pairs


def _check_qconfig(value: Any, where: str) -> None:
    if value is not None and not isinstance(value, QConfig):
        raise ValueError(f"{where}: expected a QConfig (e.g. get_default_qat_qconfig()) or None, got "
                         f"{type(value).__name__} {value!r:.60}")


def _check_type(target: Any, where: str, names: list[str]) -> None:
    if not isinstance(target, type) or not issubclass(target, nn.Module):
        raise ValueError(f"{where}: module_type entries take a module class such as nn.Conv2d, got {target!r}")


def check_module_name(target: Any, where: str, names: list[str]) -> None:
    """FAQ 2.3 Q5: module_name takes the dotted string name; an index or a wrong name would be ignored silently."""
    if not isinstance(target, str):
        index_like = sorted((n for n in names if n.endswith(f".{target}") or n == str(target)),
                            key=lambda n: (n.count("."), n))[:5]
        hint = f"; modules named like it: {', '.join(index_like)}" if index_like else ""
        raise ValueError(f"{where}: module_name must be the module's dotted name as a string (as in "
                         f"model.named_modules()), got {type(target).__name__} {target!r}{hint}")
    if target not in names:
        close = difflib.get_close_matches(target, names, n=5, cutoff=0.5)
        hint = f"; nearest names: {', '.join(close)}" if close else ""
        raise ValueError(f"{where}: no module named '{target}' in the model{hint}")


def qconfig_report(model: nn.Module, qconfig_dict: Optional[dict[str, Any]]) -> str:
    """One line per leaf module: name, type, output activation dtype (or high precision / float), weight dtype.

    The answer to "did my int16 / high-precision setting take effect?" (FAQ 2.3 Q6) before training starts.
    """
    resolved = effective_qconfigs(model, qconfig_dict or {})
    rows = [("module", "type", "output", "weight")]
    for name, module in model.named_modules():
        if name and not list(module.children()):
            qconfig = resolved[name]
            output, weight = qconfig.describe() if qconfig else ("float (not quantized)", "float")
            has_weight = isinstance(getattr(module, "weight", None), nn.Parameter)
            rows.append((name, type(module).__name__, output, weight if has_weight else "-"))
    return format_table(rows)
