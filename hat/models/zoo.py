"""The model zoo's public face: `create_model(name, **kwargs)` and `list_models()`."""
from __future__ import annotations

import fnmatch
import logging
from typing import Any, Optional

from torch import nn

from hat.checkpoint import load_pretrained
from hat.registry import get, list_registered

log = logging.getLogger("hat")


def list_models(pattern: str = "*") -> list[str]:
    """Registered zoo model names, filtered by a shell-style pattern ("resnet*")."""
    return [n for n in list_registered("model") if fnmatch.fnmatch(n, pattern)]


def create_model(name: str, pretrained: Optional[str] = None, **kwargs: Any) -> nn.Module:
    """Build zoo model `name`; `pretrained` is a checkpoint path whose matching weights are loaded and reported."""
    model = get(name, kind="model", where="model.type")(**kwargs)
    if pretrained:
        report_pretrained(pretrained, load_pretrained(model, pretrained))
    return model


def report_pretrained(path: str, report: dict[str, list[str]]) -> None:
    """Log what a pretrained load skipped, one line per kind, so a silent partial load cannot happen."""
    log.info("loaded pretrained weights from %s", path)
    for kind, keys in report.items():
        if keys:
            log.warning("pretrained %s: %d %s: %s", path, len(keys), kind.replace("_", " "), "; ".join(keys[:10]))
