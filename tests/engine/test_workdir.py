"""One run per stage folder: a second run is refused while the first lives, a killed run's lock is taken over,
and a run that fails before writing anything leaves no folder behind."""
import os
import signal
import subprocess
import sys
import time

import pytest

from hat.cli import train_main
from hat.engine.workdir import lock_path
from hat.fileio import FolderBusyError, exclusive_lock
from tests.conftest import DIGITS, ROOT

FAST = ["--config", str(DIGITS), "trainer.progress_bar=false"]


def _start_long_run(work_dir):
    """A real training process that holds work_dir/float for a long time."""
    return subprocess.Popen([sys.executable, str(ROOT / "tools" / "train.py"), *FAST, f"work_dir={work_dir}",
                             "trainer.epochs=1000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_lock(path, pid, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and f"pid {pid} " in path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} was not taken by pid {pid} within {timeout} s")


def _snapshot(folder):
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_a_second_run_into_a_busy_folder_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, capsys):
    first = _start_long_run(tmp_path)
    try:
        _wait_for_lock(lock_path(tmp_path / "float"), first.pid)
        before = _snapshot(tmp_path)
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert train_main([*FAST, f"work_dir={tmp_path}", "trainer.epochs=1", *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1].startswith(f"error: cannot write {tmp_path}/float: another run holds "
                                      f"{tmp_path}/.float.lock (pid {first.pid} on "), err
        assert first.poll() is None  # the first run goes on, its files untouched by the refused ones
        assert {k: v for k, v in _snapshot(tmp_path).items() if k in before} == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert lock_path(tmp_path / "float").is_file()  # kill -9 leaves the file, but not the lock
    assert train_main([*FAST, f"work_dir={tmp_path}", "trainer.epochs=1", "--overwrite"]) == 0
    assert not lock_path(tmp_path / "float").exists()  # released and removed at the end of the run
    assert (tmp_path / "float" / "best.pt").is_file()


def test_the_lock_is_released_on_errors_and_names_its_holder(tmp_path):
    lock = tmp_path / ".x.lock"
    with pytest.raises(RuntimeError):
        with exclusive_lock(lock, "x"):
            raise RuntimeError("boom")
    with exclusive_lock(lock, "x"):  # free again
        holder = subprocess.run([sys.executable, "-c", "from hat.fileio import exclusive_lock\n"
                                 f"with exclusive_lock({str(lock)!r}, 'cannot write x'): pass"],
                                capture_output=True, text=True, cwd=ROOT)
        assert "FolderBusyError: cannot write x: another run holds" in holder.stderr
        assert f"(pid {os.getpid()} on " in holder.stderr
    assert not lock.exists()
    assert issubclass(FolderBusyError, Exception)


def test_a_stage_that_fails_before_writing_leaves_no_folder(tmp_path, capsys):
    work_dir = tmp_path / "new_work_dir"
    assert train_main([*FAST, f"work_dir={work_dir}", "--stage", "qat"]) == 2
    assert "calibration/best.pt not found" in capsys.readouterr().err
    assert not work_dir.exists()  # neither qat/ (config.yaml only) nor the work_dir this run made
    work_dir.mkdir()
    (work_dir / "notes.txt").write_text("mine")
    assert train_main([*FAST, f"work_dir={work_dir}", "--stage", "calibration"]) == 2
    assert sorted(p.name for p in work_dir.iterdir()) == ["notes.txt"]  # a folder it did not make stays


def test_int_infer_never_replaces_a_program_silently(tmp_path, capsys):
    from hat.engine.workdir import claimed_stage_folder
    from hat.errors import ConfigError

    out = tmp_path / "int_infer"
    out.mkdir()
    (out / "model.hir").write_bytes(b"a program")
    with pytest.raises(ConfigError, match=r"int_infer already holds a run \(model\.hir\); continue it with --resume, "
                                          r"replace it with --overwrite"):
        with claimed_stage_folder(out, resume=None, overwrite=False):
            pass
    assert (out / "model.hir").read_bytes() == b"a program"
    with claimed_stage_folder(out, resume=None, overwrite=True):
        assert not (out / "model.hir").exists()


def test_empty_work_dir_is_a_config_error(capsys):
    assert train_main([*FAST, "work_dir="]) == 2
    assert "work_dir is empty; set work_dir=work_dirs/NAME" in capsys.readouterr().err
