"""Writing files safely: atomic replacement, clean-up after killed writers, and one-holder locks.

Every output HAT writes (checkpoints, programs, the zoo index) goes through `atomic_write`, so a crash leaves the
old file or the new one, never half of either; temporary files carry the writer's host and pid, so a later
writer can tell a dead writer's leftovers from a live one's and remove them.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from hat.errors import HatError

TEMP_SUFFIX = ".tmp"


class FolderBusyError(HatError):
    """Another live process holds the lock of a folder HAT is about to write into."""


def default_file_mode() -> int:
    """The permissions `open()` gives a new file under this process's umask (mkstemp would give 0600)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read the umask by setting it, then put it back
    os.umask(mask)
    return 0o666 & ~mask


def _host() -> str:
    return socket.gethostname().replace(".", "_")  # no dots: the temporary file's name is split on them


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_host()}-{os.getpid()}."


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(f)` on a temporary file beside `path`, flush it to disk, then rename it over `path`.

    A failure (or a kill) never leaves a partial `path`; the temporary file is removed on failure, and a killed
    writer's is removed by the next write into the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _writer_alive(host: str, pid: int) -> bool:
    if host != _host():
        return True  # another machine's writer (shared file system): we cannot tell, so leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphan_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files in `folder` left by writers on this machine that no longer run; returns them."""
    removed = []
    for tmp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        owner = tmp.name[:-len(TEMP_SUFFIX)].rsplit(".", 2)  # [.name, host-pid, random]
        host, _, pid = owner[1].rpartition("-") if len(owner) == 3 else ("", "", "")
        if pid.isdigit() and not _writer_alive(host, int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike, purpose: str) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` for the block, or raise FolderBusyError naming the holder's pid.

    The kernel releases the lock when its holder exits in any way (even kill -9), so a dead holder's lock file
    is simply taken over. The file is removed on release; acquiring re-checks that the locked file is still the
    one at `lock_path`, so a removal racing with a new holder cannot let two processes in."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, default_file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise FolderBusyError(f"{purpose}: another run holds {lock_path} ({_holder(lock_path)}); wait for it to "
                                  f"finish, stop it, or pick another work_dir=...") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                     .encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        os.close(fd)


def _holder(lock_path: Path) -> str:
    with contextlib.suppress(OSError):
        text = lock_path.read_text().strip()
        if text:
            return text
    return "holder unknown"
