"""Reading a CIFAR-10 python batch file without running code from it.

The batches are pickles, and `pickle.load` calls whatever a file names, so a hostile `data_batch_1` could run any
command. This reader admits only the globals a genuine batch needs (numpy's array and dtype rebuilders, and the
latin-1 `_codecs.encode` Python 3 writes for bytes at protocol < 3); anything else is refused before it is called.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hat.errors import DataError

IMAGE_VALUES = 3 * 32 * 32
NUM_CLASSES = 10
REEXTRACT = "re-extract cifar-10-python.tar.gz (from the CIFAR-10 site) into the data root"


class _Refused(Exception):
    """A global a genuine batch never holds; its `args[0]` says which."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """What Python 3 pickles bytes as at protocol < 3: `_codecs.encode(text, "latin1")`; any other use refused."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _Refused(f"_codecs.encode with {type(text).__name__} and encoding {encoding!r}")
    return text.encode("latin1")


def _admitted() -> dict[tuple[str, str], Callable[..., Any]]:
    """(module, name) -> object for each global a batch may name; numpy's helpers taken from numpy's own pickles,
    so the mapping holds for numpy 1 (`numpy.core`) and 2 (`numpy._core`) and old files load under either."""
    reconstruct = np.zeros(0).__reduce__()[0]  # numpy.*core.multiarray._reconstruct (protocols 0-4)
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy.*core.numeric._frombuffer (protocol 5)
    admitted: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        admitted[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        admitted[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return admitted


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler whose only reachable callables are the admitted ones."""

    admitted = _admitted()

    def find_class(self, module: str, name: str) -> Callable[..., Any]:
        found = self.admitted.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


def read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """The (N x 3072 uint8 images, N labels) of batch file `path`; a hostile, damaged or foreign file is a DataError."""
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="latin1").load()
    except _Refused as refused:
        raise DataError(f"CIFAR10: refused {path}: it holds a reference to {refused.args[0]}; a CIFAR-10 batch "
                        f"holds only arrays, lists and strings, so this file is not one (and could run code if "
                        f"unpickled). Nothing was run; {REEXTRACT}") from None
    except OSError as exc:
        raise DataError(f"CIFAR10: cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001  any failure of a truncated or garbage file is one clear error
        raise DataError(f"CIFAR10: {path} is not a readable CIFAR-10 batch ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:120]}); the file is truncated or damaged: {REEXTRACT}") from None
    problem = _batch_problem(batch)
    if problem:
        raise DataError(f"CIFAR10: {path} is not a CIFAR-10 batch: {problem}; {REEXTRACT}")
    return batch["data"], list(batch["labels"])


def _batch_problem(batch: Any) -> str:
    """What is wrong with the layout of an unpickled batch ('' when it is a dict of N x 3072 uint8 and N labels)."""
    if not isinstance(batch, dict):
        return f"it holds a {type(batch).__name__}, not a dict"
    data, labels = batch.get("data"), batch.get("labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == IMAGE_VALUES):
        shown = f"a {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else repr(data)[:60]
        return f"'data' is {shown}, not a uint8 array of N x {IMAGE_VALUES}"
    if not isinstance(labels, (list, tuple)) or not all(type(x) is int and 0 <= x < NUM_CLASSES for x in labels):
        return f"'labels' must be a list of ints 0..{NUM_CLASSES - 1}"
    if len(labels) != len(data):
        return f"{len(data)} images but {len(labels)} labels"
    return ""
