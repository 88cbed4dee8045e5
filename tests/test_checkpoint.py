import pytest
import torch
from torch import nn

from hat.checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from hat.errors import CheckpointError
from hat.models import create_model


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
