"""Shared fixtures: compose the real project configs, with fast settings and a temporary work_dir."""
from __future__ import annotations

import inspect
import os
import tempfile
from pathlib import Path

import pytest

from hat.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "projects" / "digits" / "convnet.yaml"
# the tests never see the user's own zoo (~/.cache/hat): list_models() lists its entries, and tests register their own
os.environ["HAT_HOME"] = tempfile.mkdtemp(prefix="hat_home_tests_")


@pytest.fixture
def digits_cfg(tmp_path):
    """Compose projects/digits/convnet.yaml with `overrides`, writing under tmp_path, without a progress bar."""

    def make(*overrides: str):
        return load_config(DIGITS, [f"work_dir={tmp_path}", "trainer.progress_bar=false", *overrides])

    return make


def zoo_model(name: str, num_classes: int = 7, size: int = 16):
    """Zoo model `name` for small test images: 1 channel for the convnets (digits-like), else 3, with the
    model's own small-image options (ResNet's CIFAR stem, the size a torchvision graph is traced at)."""
    from hat.models import create_model
    from hat.registry import get

    accepts = inspect.signature(get(name, kind="model")).parameters
    extra = {key: value for key, value in (("cifar_stem", True), ("image_size", size)) if key in accepts}
    channels = 1 if "convnet" in name else 3
    return create_model(name, num_classes=num_classes, in_channels=channels, **extra), (channels, size, size)
