"""The target march ("bayes" = J5) whose profile sets ranges and rounding for everything in hat.quant."""
from __future__ import annotations

from hat.backend.j5.profile import Profile, get_profile

_current = {"march": "bayes"}


def set_march(march: str) -> None:
    get_profile(march)  # validates the name
    _current["march"] = march


def get_march() -> str:
    return _current["march"]


def current_profile() -> Profile:
    return get_profile(_current["march"])
