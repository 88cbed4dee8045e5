"""Checkpoint files: atomic writes, safe reads (`weights_only=True`), one clear error for a bad file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hat.errors import CheckpointError


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, flush to disk, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a checkpoint on the CPU without unpickling code; a missing, truncated or foreign file raises."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and EOF errors all mean the same thing to the user
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or corrupt ({reason}). "
                              f"Use another checkpoint (e.g. best.pt instead of last.pt) or re-run the stage "
                              f"that wrote it") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of tensors")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it was not written by "
                              f"hat's trainer (it has: {', '.join(sorted(state)[:8])})")
    return state


def load_pretrained(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load matching weights from a checkpoint (hat's, or a bare state_dict) and report what did not match.

    Tensors whose shape differs (e.g. a new head) are skipped and reported, not fatal; a file that covers less than
    half of the model's values raises, since it is almost surely the checkpoint of another model.
    """
    state = load_checkpoint(path)
    weights = state.get("model", state)
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in weights.items() if k in own and hasattr(v, "shape") and v.shape != own[k].shape]
    usable = {k: v for k, v in weights.items() if k in own and getattr(v, "shape", None) == own[k].shape}
    matched = sum(v.numel() for v in usable.values() if v.is_floating_point())
    total = sum(v.numel() for v in own.values() if v.is_floating_point())
    if matched < 0.5 * total:  # a new head is fine; a checkpoint of another architecture is not
        sample = ", ".join(list(weights)[:3])
        raise CheckpointError(f"pretrained checkpoint {path} matches no weight of {type(model).__name__} beyond "
                              f"{100 * matched / max(total, 1):.0f}% of its values (checkpoint keys look like: "
                              f"{sample}); is it the checkpoint of another model?")
    model.load_state_dict(usable, strict=False)
    return {"missing": [k for k in own if k not in usable and k not in (m.split(":")[0] for m in mismatched)],
            "unexpected": [k for k in weights if k not in own],
            "shape_mismatch": mismatched}
