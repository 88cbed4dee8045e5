"""Checkpoint files: atomic writes, a content checksum, safe reads (`weights_only=True`), one clear error per fault."""
from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hat.errors import CheckpointError
from hat.fileio import atomic_write

CHECKSUM_KEY = "content_sha256"
_REFUSED_GLOBAL = re.compile(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL)\s+([\w.]+)")  # torch's words


def content_checksum(value: Any) -> str:
    """sha256 over every tensor's dtype, shape and bytes and every plain value, in the order the state holds them:
    a flipped bit anywhere in the weights changes it."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{flat.dtype}{tuple(value.shape)}|".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}|".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__[0]}{len(value)}|".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__}:{value!r}|".encode())


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` with its content checksum, atomically (a crash never leaves half a file). A write that fails
    (disk full, no permission) is a CheckpointError naming the file; the previous file stays as it was."""
    path = Path(path)
    stored = {**state, CHECKSUM_KEY: content_checksum(state)}
    try:
        atomic_write(path, lambda f: torch.save(stored, f))
    except (OSError, RuntimeError) as exc:
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:200]
        raise CheckpointError(f"cannot write checkpoint {path}: {reason}. Free disk space or make the folder "
                              f"writable, then continue with --resume (the previous checkpoint is intact)") from None


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a checkpoint on the CPU without unpickling code and verify its content checksum (when it has one: a
    plain state_dict from elsewhere has none); a missing, truncated, altered or code-carrying file raises."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _REFUSED_GLOBAL.search(str(exc))
        if refused:
            raise CheckpointError(f"refused: checkpoint {path} holds Python objects that would run code when loaded "
                                  f"(a reference to {refused.group(1)}); hat loads only tensors and plain values. "
                                  f"Where the file came from, save the weights alone: torch.save(model.state_dict(), "
                                  f"path)") from None
        raise _corrupt(path, exc) from None
    except Exception as exc:  # zip and EOF errors all mean the same thing to the user
        raise _corrupt(path, exc) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of tensors")
    expected = state.pop(CHECKSUM_KEY, None)
    if expected is not None and content_checksum(state) != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt: its content does not match the checksum written with "
                              f"it (a bit changed on disk or in a copy). Use another checkpoint (e.g. best.pt "
                              f"instead of last.pt) or copy it again")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it was not written by "
                              f"hat's trainer (it has: {', '.join(sorted(state)[:8])})")
    return state


def _corrupt(path: Path, exc: Exception) -> CheckpointError:
    reason = " ".join(str(exc).split())[:200]
    return CheckpointError(f"cannot read checkpoint {path}: the file is truncated or corrupt ({reason}). Use another "
                           f"checkpoint (e.g. best.pt instead of last.pt) or re-run the stage that wrote it")


def load_weights(model: nn.Module, weights: dict[str, Any], path: str | Path, fix: str) -> None:
    """Load a full state_dict into `model`; one that does not fit (another architecture, other class count) is a
    CheckpointError naming the file, the first mismatches and `fix`, what the user should do."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path} does not fit this config's model ({reason}): {fix}") from None


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
