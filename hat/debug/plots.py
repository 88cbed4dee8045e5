"""PNG plots of the debug reports (matplotlib, no screen needed)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

INF_DB = 100.0  # where an exact (infinite SQNR) layer is drawn


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_similarity(report, path: Path) -> Path:
    """SQNR per layer for each step of the pipeline (float-QAT, QAT-quantized); exact layers at the top."""
    from hat.debug.similarity import STEPS

    plt = _pyplot()
    names = [r.layer for r in report]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(names) + 2), 4.5))
    for step in STEPS[:2]:
        values = [min(r.diffs[step].sqnr_db, INF_DB) if step in r.diffs else math.nan for r in report]
        ax.plot(range(len(names)), values, marker="o", label=f"{step[0]} vs {step[1]}")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel(f"SQNR dB (exact drawn at {INF_DB:.0f})")
    ax.set_title("per-layer similarity")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_bars(names: Sequence[str], values: Sequence[float], ylabel: str, title: str, path: Path) -> Path:
    """One bar per layer (sensitivity gains, MACs)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(names) + 2), 4.5))
    ax.bar(range(len(names)), values)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
