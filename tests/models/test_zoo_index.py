"""The local zoo: register a finished project with one command, reuse it by name, sha256-verified, nothing downloads."""
import pytest
import torch

from hat.checkpoint import save_checkpoint
from hat.cli import zoo_main
from hat.errors import CheckpointError, ConfigError
from hat.models import create_model
from hat.models.zoo_index import read_index, zoo_dir
from tests.conftest import DIGITS


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A digits project whose float stage 'finished' (weights saved as the trainer does), HAT_HOME in tmp_path."""
    monkeypatch.setenv("HAT_HOME", str(tmp_path / "hat_home"))
    torch.manual_seed(1)
    model = create_model("convnet_small", num_classes=10, in_channels=1)
    save_checkpoint({"model": model.state_dict(), "metrics": {"val/top1": 97.5}}, tmp_path / "float" / "best.pt")
    return tmp_path, model


def test_register_then_create_model_by_name_loads_the_weights(project, capsys):
    work_dir, trained = project
    assert zoo_main(["register", "--config", str(DIGITS), f"work_dir={work_dir}"]) == 0
    assert "registered digits_convnet_small" in capsys.readouterr().out
    item = read_index()["digits_convnet_small"]
    assert item["model"] == {"type": "convnet_small", "num_classes": 10, "in_channels": 1}
    assert item["metrics"] == {"val/top1": 97.5} and len(item["sha256"]) == 64
    for model in (create_model("digits_convnet_small", pretrained=True),
                  create_model("convnet_small", pretrained="zoo:digits_convnet_small")):
        for key, value in trained.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
    assert zoo_main(["list"]) == 0 and "digits_convnet_small         convnet_small" in capsys.readouterr().out


def test_a_damaged_zoo_file_is_refused(project):
    work_dir, _ = project
    zoo_main(["register", "--config", str(DIGITS), f"work_dir={work_dir}", "--name", "digits"])
    with open(zoo_dir() / "digits.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(CheckpointError, match="zoo entry 'digits': .* has sha256 .* the index says"):
        create_model("digits", pretrained=True)


def test_an_unknown_entry_lists_what_there_is_and_how_to_add_one(project):
    with pytest.raises(ConfigError, match=r"no pretrained weights named 'resnet18' in the local zoo .* \(entries: none\)"
                                          r".*tools/zoo.py register"):
        create_model("resnet18", pretrained=True)


def test_registering_twice_needs_overwrite_and_remove_deletes(project, capsys):
    work_dir, _ = project
    args = ["register", "--config", str(DIGITS), f"work_dir={work_dir}", "--name", "d"]
    assert zoo_main(args) == 0 and zoo_main(args) == 2
    assert "zoo entry 'd' exists" in capsys.readouterr().err
    assert zoo_main([*args, "--overwrite"]) == 0
    assert zoo_main(["remove", "d"]) == 0 and read_index() == {} and not (zoo_dir() / "d.pt").exists()


def test_the_float_stage_starts_from_a_zoo_entry(project, digits_cfg, caplog):
    work_dir, _ = project
    zoo_main(["register", "--config", str(DIGITS), f"work_dir={work_dir}", "--name", "start"])
    from hat.engine.stages import run_stage

    with caplog.at_level("INFO", logger="hat"):
        run_stage(digits_cfg("trainer.epochs=1", "pretrained=zoo:start", f"work_dir={work_dir / 'fine_tune'}"))
    assert f"loaded pretrained weights from {zoo_dir() / 'start.pt'}" in caplog.text
