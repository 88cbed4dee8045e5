import os
import resource
import signal
import stat
import subprocess
import sys

import pytest
import torch
from torch import nn

from hat.checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from hat.errors import CheckpointError
from hat.models import create_model
from tests.conftest import DIGITS, ROOT


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    save_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["model"]["w"], torch.ones(2))


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"v": torch.tensor(1)}, path)
    with pytest.raises(Exception):
        save_checkpoint({"v": lambda: None}, path)  # not picklable: fails mid-write
    assert load_checkpoint(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.randn(1000)}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {path}: the file is truncated or corrupt"):
        load_checkpoint(path)


def test_garbage_file_and_missing_file(tmp_path):
    garbage = tmp_path / "x.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_required_keys(tmp_path):
    save_checkpoint({"w": torch.ones(1)}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="lacks model, epoch"):
        load_checkpoint(tmp_path / "a.pt", required=("model", "epoch"))


def test_pretrained_reports_shape_mismatch_missing_and_unexpected(tmp_path):
    source = create_model("convnet_small", num_classes=10)
    state = dict(source.state_dict(), **{"extra.weight": torch.ones(1)})
    save_checkpoint({"model": state}, tmp_path / "src.pt")
    target = create_model("convnet_small", num_classes=5)
    report = load_pretrained(target, tmp_path / "src.pt")
    assert report["shape_mismatch"] == ["head.2.weight: checkpoint (10, 64) vs model (5, 64)",
                                        "head.2.bias: checkpoint (10,) vs model (5,)"]
    assert report["unexpected"] == ["extra.weight"] and report["missing"] == []
    key = "backbone.0.0.weight"
    assert torch.equal(target.state_dict()[key], source.state_dict()[key])


@pytest.mark.parametrize("source", ["linear", "resnet18"])
def test_pretrained_from_another_model_is_refused(tmp_path, source):
    """BatchNorm's num_batches_tracked matches in any two models: it must not count as a match."""
    model = nn.Linear(2, 2) if source == "linear" else create_model("resnet18", num_classes=10)
    save_checkpoint(model.state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="matches no weight of Classifier"):
        create_model("convnet_small", pretrained=str(tmp_path / "other.pt"))


# Integrity and safety: attacks and faults as they happen
def test_a_flipped_bit_in_a_weight_is_detected(tmp_path):
    path = tmp_path / "last.pt"
    weight = torch.arange(4096, dtype=torch.float32)
    save_checkpoint({"model": {"w": weight}, "epoch": 3}, path)
    blob = bytearray(path.read_bytes())
    at = bytes(blob).index(weight[1000:1004].numpy().tobytes())  # the tensor's bytes, stored uncompressed
    blob[at] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is corrupt: its content does not match the "
                                              f"checksum written with it"):
        load_checkpoint(path)


def test_a_code_payload_is_refused_for_what_it_is_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"refused: checkpoint .*evil\.pt holds Python objects that would run "
                                              r"code when loaded \(a reference to posix\.system\)"):
        load_checkpoint(path)
    assert not marker.exists()


def test_orphan_temp_files_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    script = ("import os, sys, time\nfrom hat.fileio import atomic_write\n"
              "def write(f):\n    f.write(b'half a checkpoint'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
              f"atomic_write({str(tmp_path / 'last.pt')!r}, write)\n")
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    orphans = list(tmp_path.glob(".last.pt.*.tmp"))
    assert len(orphans) == 1 and f"-{writer.pid}." in orphans[0].name
    alive = tmp_path / f".best.pt.{orphans[0].name.split('.')[3]}-{os.getpid()}.x.tmp"  # a live writer's: kept
    alive.write_bytes(b"")
    save_checkpoint({"v": torch.tensor(1)}, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.pt", alive.name])


def test_checkpoints_get_the_permissions_of_other_outputs(tmp_path):
    save_checkpoint({"v": torch.tensor(1)}, tmp_path / "last.pt")
    (tmp_path / "config.yaml").write_text("a: 1")
    assert stat.S_IMODE((tmp_path / "last.pt").stat().st_mode) == stat.S_IMODE((tmp_path / "config.yaml").stat().st_mode)


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """The file-size limit makes writes fail as on a full disk (EFBIG instead of ENOSPC), in a real training run."""
    common = [sys.executable, str(ROOT / "tools" / "train.py"), "--config", str(DIGITS), f"work_dir={tmp_path}",
              "trainer.progress_bar=false", "model.type=convnet_base"]
    assert subprocess.run([*common, "trainer.epochs=1"], capture_output=True, timeout=300).returncode == 0
    last = tmp_path / "float" / "last.pt"
    before = last.read_bytes()

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, len(before) // 2))

    result = subprocess.run([*common, "trainer.epochs=2", "--resume"], capture_output=True, text=True, timeout=300,
                            preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot write checkpoint {last}: File too large. "
                                                             f"Free disk space")
    assert "Traceback" not in result.stderr
    assert last.read_bytes() == before and not list(last.parent.glob(".*.tmp"))
    assert load_checkpoint(last)["epoch"] == 1
