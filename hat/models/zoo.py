"""The model zoo's public face: `create_model(name, pretrained=..., **kwargs)` and `list_models()`."""
from __future__ import annotations

import difflib
import fnmatch
import logging
from typing import Any

from torch import nn

from hat.checkpoint import load_pretrained
from hat.models.zoo_index import pretrained_path, read_index
from hat.errors import RegistryError
from hat.registry import build, get, list_registered

log = logging.getLogger("hat")


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Every name create_model takes, filtered by a shell-style pattern ("resnet*"): the registered models, then the
    entries of the local zoo ($HAT_HOME/zoo); `pretrained=True`: only the zoo entries (the names with weights)."""
    entries = sorted(read_index())
    names = entries if pretrained else [*list_registered("model"), *(n for n in entries
                                                                     if n not in list_registered("model"))]
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def create_model(name: str, pretrained: Any = None, **kwargs: Any) -> nn.Module:
    """Build zoo model `name`: a registered model, or an entry of the local zoo index (its model config; `kwargs`
    override it). `pretrained`: a checkpoint path, `zoo:NAME`, or True for the zoo entry `name` (sha256-verified);
    matching weights are loaded and what did not match is reported."""
    registered = list_registered("model")
    index = {} if name in registered else read_index()
    if name in index:  # a zoo model's arguments, or a structure (Detector, ...) built from its parts
        model = build({**index[name]["model"], **kwargs}, f"zoo entry '{name}' model", kind=("model", "structure"))
    elif name not in registered and index:  # a misspelled name: close matches among models and local zoo entries
        close = difflib.get_close_matches(name, [*registered, *index], n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise RegistryError(f"create_model: '{name}' is neither a registered model nor a local zoo entry.{hint} "
                            f"(`python tools/zoo.py list` shows the entries, `python tools/train.py --list model` "
                            f"the models)")
    else:
        model = get(name, kind="model", where="model.type")(**kwargs)
    path = pretrained_path(pretrained, name)
    if path:
        report_pretrained(path, load_pretrained(model, path))
    return model


def report_pretrained(path: str, report: dict[str, list[str]]) -> None:
    """Log what a pretrained load skipped, one line per kind, so a silent partial load cannot happen."""
    log.info("loaded pretrained weights from %s", path)
    for kind, keys in report.items():
        if keys:
            log.warning("pretrained %s: %d %s: %s", path, len(keys), kind.replace("_", " "), "; ".join(keys[:10]))
