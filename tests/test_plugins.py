"""User code without a fork: a config's `imports:` (through the real CLI), the model contract, plugin entry points."""
import subprocess
import sys
from pathlib import Path

import pytest

from hat.cli import predict_main, train_main
from hat.errors import ConfigError, HatError
from hat.plugins import import_config_modules, load_entry_points

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "projects" / "digits" / "convnet.yaml"

USER_MODULE = '''
from torch import nn

from hat.models.classifier import Classifier, ClsHead
from hat.registry import register


@register(kind="model")
def user_tiny_net(num_classes=10, in_channels=1):
    backbone = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    return Classifier(backbone, ClsHead(8, num_classes))


@register(kind="model")
def user_plain_linear(num_classes=10, in_channels=1):
    return nn.Linear(64, num_classes)  # no (loss, outputs), no deploy_model(): not a HAT model
'''


@pytest.fixture
def user_project(tmp_path):
    """A folder of the user's own: a model module and a config that imports it (not in the hat package)."""
    (tmp_path / "user_models_for_test.py").write_text(USER_MODULE)
    config = tmp_path / "user.yaml"
    config.write_text(DIGITS.read_text().replace("type: convnet_small", "type: user_tiny_net")
                      + "\nimports: [user_models_for_test]\n")
    return config


def test_a_model_from_the_users_own_module_trains_through_the_cli(user_project, tmp_path, capsys):
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "train.py"), "--config", str(user_project),
                             "--stage", "float", "trainer.epochs=1", f"work_dir={work}", "trainer.progress_bar=false"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "stage float done" in result.stderr
    assert predict_main(["--config", str(user_project), f"work_dir={work}"]) == 0  # every tool honours imports
    assert f"float {work}/float/best.pt: val/loss" in capsys.readouterr().out


def test_a_registered_model_that_breaks_the_contract_is_one_line(user_project, tmp_path, capsys):
    argv = ["--config", str(user_project), "model.type=user_plain_linear", f"work_dir={tmp_path / 'w'}"]
    assert train_main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model.type 'user_plain_linear' builds torch.nn.modules.linear.Linear" in error
    assert "forward(images, targets) returns (loss, outputs)" in error and "deploy_model()" in error


def test_imports_that_fail_say_which_and_where_to_put_the_module(tmp_path):
    with pytest.raises(ConfigError, match=r"imports: 'no_such_user_module': no module named 'no_such_user_module'; "
                                          r"put no_such_user_module\.py next to the config"):
        import_config_modules(["no_such_user_module"], tmp_path)
    (tmp_path / "broken_user_module.py").write_text("import math\nraise RuntimeError('half-written model file')\n")
    with pytest.raises(ConfigError, match=r"'broken_user_module' failed to import: RuntimeError: half-written "
                                          r"model file \(.*broken_user_module\.py:2\)"):
        import_config_modules(["broken_user_module"], tmp_path)
    with pytest.raises(ConfigError, match=r"imports: expected a list of module names"):
        import_config_modules("one_string", tmp_path)


def test_a_broken_entry_point_plugin_is_named(monkeypatch):
    class Point:
        name, value, dist = "broken", "broken_pkg.models", type("Dist", (), {"name": "broken-pkg"})()

        def load(self):
            raise ImportError("cannot import name 'Backbone'")

    monkeypatch.setattr("hat.plugins.entry_points", lambda group: [Point()] if group == "hat.plugins" else [])
    with pytest.raises(HatError, match=r"plugin 'broken' \(hat\.plugins entry point of package broken-pkg, "
                                       r"'broken_pkg\.models'\) failed to import: ImportError"):
        load_entry_points()
