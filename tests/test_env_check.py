"""tools/check_env.py (FAQ 2.2 Q1/Q2): every check reported, exit 0/1, and the fix for what fails."""
import subprocess
import sys

import pytest
import torch

from hat import env_check
from hat.cli import check_env_main
from hat.ops.loader import ExtensionStatus
from tests.conftest import ROOT


def test_this_environment_is_ready(capsys):
    assert check_env_main([]) == 0
    out = capsys.readouterr().out
    assert f"ok    torch        {torch.__version__}" in out
    assert "matmul cpu" in out and "GFLOP/s" in out
    assert "hat._C       CPU" in out and out.rstrip().endswith("ready")


def test_an_unusable_extension_fails_with_the_rebuild_command(monkeypatch, capsys):
    monkeypatch.setattr(env_check, "extension_status",
                        lambda: ExtensionStatus(False, False, "it was built against torch 1.13.0"))
    assert check_env_main([]) == 1
    out = capsys.readouterr().out
    assert "FAIL  hat._C       not loaded: it was built against torch 1.13.0" in out
    assert "fix: rebuild: pip install --no-build-isolation -e ." in out and "NOT ready: hat._C" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_require_gpu_without_one_fails_and_says_where_to_look(capsys):
    assert check_env_main(["--require-gpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  gpu" in out and "nvidia-smi" in out and "--gpus all" in out


def test_torchvision_cuda_versions_are_compared_in_one_form():
    assert env_check._cuda_version("13000") == "13.0" and env_check._cuda_version("12.4") == "12.4"
    assert env_check._cuda_version(None) == ""


def test_the_tool_says_how_to_install_when_hat_cannot_be_imported(tmp_path):
    result = subprocess.run([sys.executable, "-S", "-I", str(ROOT / "tools" / "check_env.py")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)  # no site-packages: no hat
    assert result.returncode == 1 and "FAIL  hat          cannot be imported" in result.stdout
    assert "make setup" in result.stdout
