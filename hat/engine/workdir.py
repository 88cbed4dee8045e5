"""The stage folder `work_dir/<stage>/`: one run at a time, never replaced silently, gone if a failed run wrote
nothing into it."""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Iterator, Optional

from hat.engine import distributed
from hat.errors import ConfigError
from hat.fileio import FolderBusyError, exclusive_lock, remove_orphan_temps

log = logging.getLogger("hat")
RESULT_FILES = ("last.pt", "best.pt", "model.hir", "metrics.json")  # a folder holding one of these holds a run
OWN_FILES = ("config.yaml",)  # written by run_stage before the stage itself writes anything


def lock_path(out_dir: Path) -> Path:
    """The lock of a stage folder lives beside it, so replacing the folder (--overwrite) keeps the lock."""
    return out_dir.parent / f".{out_dir.name}.lock"


@contextlib.contextmanager
def claimed_stage_folder(out_dir: Path, resume: Optional[str], overwrite: bool) -> Iterator[Path]:
    """Own `out_dir` for the block: rank 0 holds its lock (every rank stops when it cannot), an earlier run there
    is refused unless resumed or replaced (`overwrite` removes it first), and a run that fails before writing a
    result removes the folders it created."""
    main = distributed.world().is_main
    created = [out_dir.parent] if main and not out_dir.parent.is_dir() else []
    try:
        with _rank0_lock(out_dir):
            if main:
                created += [out_dir] if not out_dir.is_dir() else []
                remove_orphan_temps(out_dir)
            _check_previous_run(out_dir, resume, overwrite)
            yield out_dir
    except BaseException:
        _remove_if_unused(created)  # after the lock is gone: its file lives in work_dir
        raise


@contextlib.contextmanager
def _rank0_lock(out_dir: Path) -> Iterator[None]:
    """Rank 0 holds the folder's lock; when it cannot take it, every rank raises (no rank waits for a peer)."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if distributed.world().is_main:
            try:
                stack.enter_context(exclusive_lock(lock_path(out_dir), f"cannot write {out_dir}"))
            except FolderBusyError as exc:
                refusal = exc
        if distributed.ranks_where(refusal is not None):
            raise refusal or FolderBusyError(f"rank 0 could not lock {out_dir}; see its error")
        yield


def _check_previous_run(out_dir: Path, resume: Optional[str], overwrite: bool) -> None:
    previous = [name for name in RESULT_FILES if (out_dir / name).exists()]
    if not previous or resume:
        return
    if not overwrite:
        raise ConfigError(f"{out_dir} already holds a run ({previous[0]}); continue it with --resume, replace it "
                          f"with --overwrite, or pick another work_dir=...")
    distributed.barrier()  # every rank has seen the old run before rank 0 removes it
    if distributed.world().is_main:
        shutil.rmtree(out_dir)  # no stale best.pt or TensorBoard curves from the replaced run
        log.info("removed the previous run in %s (--overwrite)", out_dir)


def _remove_if_unused(created: list[Path]) -> None:
    """Remove the folders this run created (the stage folder, then work_dir) when it failed before writing
    anything but its own config."""
    for folder in reversed(created):
        if folder.is_dir() and not any(p.is_file() and p.name not in OWN_FILES for p in folder.rglob("*")):
            shutil.rmtree(folder, ignore_errors=True)
