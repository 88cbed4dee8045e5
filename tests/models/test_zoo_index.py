"""The local zoo: register a finished project with one command, reuse it by name, sha256-verified, nothing downloads."""
import json

import pytest
import torch

from hat.checkpoint import save_checkpoint
from hat.cli import zoo_main
from hat.errors import CheckpointError, ConfigError, RegistryError
from hat.models import create_model, list_models, zoo, zoo_index
from hat.models.zoo_index import read_index, sha256, zoo_dir
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


def test_a_detector_structure_registers_and_rebuilds_from_its_parts(tmp_path, monkeypatch, capsys):
    from hat.config import load_config
    from hat.engine.stages import build_model
    from tests.conftest import ROOT

    monkeypatch.setenv("HAT_HOME", str(tmp_path / "hat_home"))
    config = ROOT / "projects" / "detection" / "fcos_digits.yaml"
    trained = build_model(load_config(config))
    save_checkpoint({"model": trained.state_dict(), "metrics": {"val/mAP": 60.0}}, tmp_path / "float" / "best.pt")
    assert zoo_main(["register", "--config", str(config), "--name", "fcos_digits", f"work_dir={tmp_path}"]) == 0
    model = create_model("fcos_digits", pretrained=True)
    assert type(model).__name__ == "Detector"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.state_dict().items())


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


@pytest.fixture
def hostile_zoo(project, request):
    """A zoo whose entry 'evil' points at victim.pt outside the zoo folder, in the way `request.param` names; the
    index's sha256 matches the victim, so only the path check stands between the entry and the file."""
    work_dir, trained = project
    victim = work_dir / "victim.pt"
    save_checkpoint({"model": trained.state_dict()}, victim)
    folder = zoo_dir()
    folder.mkdir(parents=True)
    checkpoint = {"traversal": "../../victim.pt", "absolute": str(victim), "symlink": "evil.pt",
                  "the_index": "index.json"}[request.param]
    if request.param == "symlink":
        (folder / "evil.pt").symlink_to(victim)
    item = {"model": {"type": "convnet_small", "num_classes": 10, "in_channels": 1}, "checkpoint": checkpoint,
            "sha256": sha256(victim), "metrics": {}}
    (folder / "index.json").write_text(json.dumps({"evil": item}))
    return victim, _snapshot(work_dir)


def _snapshot(root):
    """Every path under `root` (links not followed) with its bytes, to show a refused command changed nothing."""
    return {p: (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


ATTACKS = ["traversal", "absolute", "symlink", "the_index"]


@pytest.mark.parametrize("hostile_zoo", ATTACKS, indirect=True)
def test_loading_a_zoo_entry_that_leads_outside_the_zoo_reads_nothing(hostile_zoo, project, monkeypatch):
    victim, before = hostile_zoo
    opened = []
    monkeypatch.setattr(zoo_index, "sha256", lambda path: opened.append(path))
    monkeypatch.setattr(zoo, "load_pretrained", lambda model, path: opened.append(path))
    for pretrained in (True, "zoo:evil"):
        with pytest.raises(CheckpointError, match=r"zoo entry 'evil' in .*index.json: 'checkpoint' .* (is not the name "
                                                  r"of a file in|leads \(through a symlink\) to .*, not a file in) the "
                                                  r"zoo folder .*nothing was read or deleted.*delete the entry"):
            create_model("evil", pretrained=pretrained)
    assert opened == [] and _snapshot(project[0]) == before


@pytest.mark.parametrize("hostile_zoo", ATTACKS, indirect=True)
def test_removing_a_zoo_entry_that_leads_outside_the_zoo_deletes_nothing(hostile_zoo, project, capsys):
    victim, before = hostile_zoo
    assert zoo_main(["remove", "evil"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: zoo entry 'evil' in ") and "nothing was read or deleted" in err
    assert err.count("\n") == 1 and victim.is_file() and _snapshot(project[0]) == before  # index, link, victim kept


def test_a_misspelled_zoo_name_gets_a_did_you_mean_among_the_entries(project, capsys):
    work_dir, _ = project
    assert zoo_main(["register", "--config", str(DIGITS), f"work_dir={work_dir}"]) == 0
    with pytest.raises(RegistryError, match=r"'digits_convnet_smal' is neither a registered model nor a local zoo "
                                            r"entry\. Did you mean 'digits_convnet_small'"):
        create_model("digits_convnet_smal", pretrained=True)


@pytest.fixture(scope="module")
def finished_project(tmp_path_factory):
    """A digits project that ran all four stages (short), so its zoo entry is deployable."""
    from hat.config import load_config
    from hat.engine.stages import run_stage

    work = tmp_path_factory.mktemp("finished")
    metrics = {}
    for stage in ("float", "calibration", "qat", "int_infer"):
        metrics[stage] = run_stage(load_config(DIGITS, [f"work_dir={work}", "trainer.progress_bar=false",
                                                        f"stage={stage}", "trainer.epochs=2",
                                                        "stages.qat.trainer.epochs=1"]))
    return work, metrics


def test_a_finished_project_registers_a_deployable_entry(finished_project, tmp_path, monkeypatch, capsys):
    from hat import backend
    from hat.cli import predict_main, train_main

    work_dir, metrics = finished_project
    monkeypatch.setenv("HAT_HOME", str(tmp_path / "hat_home"))
    assert zoo_main(["register", "--config", str(DIGITS), f"work_dir={work_dir}", "--name", "digits"]) == 0
    assert "files: float weights, QAT checkpoint, integer program" in capsys.readouterr().out
    assert {p.name for p in zoo_dir().iterdir()} == {"index.json", "digits.pt", "digits.qat.pt", "digits.hir"}
    assert zoo_main(["list"]) == 0 and "files: float+qat+program" in capsys.readouterr().out
    assert list_models(pretrained=True) == ["digits"] and list_models()[-1] == "digits"
    assert train_main(["--list", "model"]) == 0 and capsys.readouterr().out.strip().endswith("): digits")

    assert zoo_main(["path", "digits", "--kind", "program"]) == 0
    program = backend.load(capsys.readouterr().out.strip())  # deployable straight from the zoo
    assert (work_dir / "int_infer" / "model.hir").read_bytes() == (zoo_dir() / "digits.hir").read_bytes()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(program(x), backend.load(work_dir / "int_infer" / "model.hir")(x))
    elsewhere = f"work_dir={tmp_path / 'empty'}"  # the zoo entry is all predict needs
    assert predict_main(["--config", str(DIGITS), "--stage", "int_infer", "--ckpt", "zoo:digits", elsewhere]) == 0
    assert f"val/top1 {metrics['int_infer']['val/top1']:.4f}" in capsys.readouterr().out
    assert predict_main(["--config", str(DIGITS), "--stage", "qat", "--ckpt", "zoo:digits", elsewhere]) == 0
    assert f"val/top1 {metrics['qat']['val/top1']:.4f}" in capsys.readouterr().out

    (work_dir / "int_infer" / "metrics.json").rename(work_dir / "int_infer" / "metrics.moved")
    try:  # int_infer did not finish: float weights and QAT checkpoint only, the old program goes
        assert zoo_main(["register", "--config", str(DIGITS), f"work_dir={work_dir}", "--name", "digits",
                         "--overwrite"]) == 0
    finally:
        (work_dir / "int_infer" / "metrics.moved").rename(work_dir / "int_infer" / "metrics.json")
    assert "not deployable yet: run the qat and int_infer stages" in capsys.readouterr().out
    assert not (zoo_dir() / "digits.hir").exists()
    with pytest.raises(CheckpointError, match=r"zoo entry 'digits' has no integer program \(it holds: float, qat\)"):
        zoo_index.verified_checkpoint("digits", "program")
    assert zoo_main(["remove", "digits"]) == 0 and {p.name for p in zoo_dir().iterdir()} == {"index.json"}


def test_a_misspelled_pretrained_entry_gets_a_did_you_mean(project):
    work_dir, _ = project
    assert zoo_main(["register", "--config", str(DIGITS), f"work_dir={work_dir}", "--name", "digits_small"]) == 0
    with pytest.raises(ConfigError, match=r"no pretrained weights named 'digits_smal' .*Did you mean 'digits_small'"):
        create_model("convnet_small", pretrained="zoo:digits_smal")
