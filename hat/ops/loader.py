"""Loading hat._C (the compiled kernels), with one clear warning and a pure-PyTorch fallback when it can't be used.

FAQ 2.4 Q1/Q2 ("Cannot find the extension library", "Cannot load custom ops. Please rebuild"): here a missing
or mismatched library never stops training; the warning names the cause and the rebuild command, and
HAT_REQUIRE_EXT=1 turns it into an error (for deployment machines that must run the kernels).
HAT_USE_EXT=0 selects the reference ops on purpose, without a warning.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch

from hat.errors import HatError

REBUILD = "pip install --no-build-isolation -e .  (in the HAT checkout; `make setup` does the same)"


class ExtensionError(HatError):
    """hat._C is required (HAT_REQUIRE_EXT=1) but can't be used."""


class ExtensionWarning(UserWarning):
    """hat._C can't be used; HAT runs the pure-PyTorch reference ops instead."""


@dataclass(frozen=True)
class ExtensionStatus:
    loaded: bool
    cuda: bool  # CUDA kernels present
    reason: str = ""  # why not loaded (empty when loaded, or when switched off with HAT_USE_EXT=0)


def expected_file(module: str = "hat._C") -> str:
    package, name = module.rsplit(".", 1)
    folder = os.path.dirname(importlib.import_module(package).__file__)
    return os.path.join(folder, name + importlib.machinery.EXTENSION_SUFFIXES[0])


def build_mismatch(built_torch: str, built_cuda: str) -> Optional[str]:
    """Why a library built against `built_torch`/`built_cuda` can't run under this torch; None when it can."""
    if built_torch != torch.__version__:
        return f"it was built against torch {built_torch}, this is torch {torch.__version__}"
    if built_cuda and built_cuda != torch.version.cuda:
        return f"its CUDA kernels were built for CUDA {built_cuda}, this torch runs CUDA {torch.version.cuda}"
    return None


def load_extension(module: str = "hat._C") -> ExtensionStatus:
    """Import the compiled ops; on failure warn once (or raise with HAT_REQUIRE_EXT=1) and report why."""
    if os.environ.get("HAT_USE_EXT", "1") == "0":
        return ExtensionStatus(False, False)
    try:
        lib: ModuleType = importlib.import_module(module)
        reason = build_mismatch(lib.torch_version, lib.cuda_version)
    except ImportError as error:  # missing file, or a library whose symbols this torch lacks
        reason = f"importing {module} failed: {error}"
        lib = None
    if reason is None:
        return ExtensionStatus(True, bool(lib.cuda_version))
    message = (f"HAT custom ops ({module}) not usable: {reason}. Looked for {expected_file(module)}. "
               f"Rebuild with: {REBUILD}")
    if os.environ.get("HAT_REQUIRE_EXT", "0") == "1":
        raise ExtensionError(message + ". (HAT_REQUIRE_EXT=1 makes this an error; unset it to fall back.)")
    warnings.warn(message + ". Falling back to the pure-PyTorch reference ops: same results, slower. Set "
                  "HAT_REQUIRE_EXT=1 to make this an error.", ExtensionWarning, stacklevel=2)
    return ExtensionStatus(False, False, reason)
