"""The default march of the qconfigs made without `march=` ("bayes" = J5), as `quant.set_march` sets it.

A qconfig carries its march; prepare_qat gives it to each QAT module, convert to each quantized module, and
QTensors carry the profile of the module that made them: no global is read while a model computes. The engine
passes the config's `quant.march` explicitly.
"""
from __future__ import annotations

from hat.integer.profile import get_profile

_default = {"march": "bayes"}


def set_march(march: str) -> None:
    """The march of qconfigs made from now on without an explicit `march=` (get_default_qat_qconfig & co.)."""
    get_profile(march)  # validates the name
    _default["march"] = march


def get_march() -> str:
    return _default["march"]
