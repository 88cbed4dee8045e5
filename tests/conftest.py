"""Shared fixtures: compose the real project configs, with fast settings and a temporary work_dir."""
from __future__ import annotations

from pathlib import Path

import pytest

import hat  # noqa: F401  (registration)
from hat.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "projects" / "digits" / "convnet.yaml"


@pytest.fixture
def digits_cfg(tmp_path):
    """Compose projects/digits/convnet.yaml with `overrides`, writing under tmp_path, without a progress bar."""

    def make(*overrides: str):
        return load_config(DIGITS, [f"work_dir={tmp_path}", "trainer.progress_bar=false", *overrides])

    return make
