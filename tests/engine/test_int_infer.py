"""int_infer pieces and tools/check_model.py without a full training run."""
import pytest
import torch
from torch import nn

from hat import backend
from hat.backend.j5.checker import ModelCheckError
from hat.cli import check_model_main
from hat.engine.int_infer import check_and_compile
from hat.engine.stages import run_stage
from hat.errors import CheckpointError
from tests.backend.conftest import calibrate_and_convert
from tests.backend.test_checker import Net
from tests.conftest import DIGITS


def test_check_model_before_any_training_and_on_a_broken_quant_config(tmp_path, capsys):
    export = ["--export", str(tmp_path / "m.hir")]
    assert check_model_main(["--config", str(DIGITS), f"work_dir={tmp_path}", *export]) == 0
    out = capsys.readouterr().out
    assert "initial (untrained) weights" in out and "deployable on bayes" in out
    assert backend.load(tmp_path / "m.hir").nodes[0].op == "quantize"
    assert check_model_main(["--config", str(DIGITS), f"work_dir={tmp_path}",
                             "quant.high_precision_outputs=[backbone.2]"]) == 1
    assert "NOT deployable on bayes: module 'backbone.2.0' has a high-precision (qint32) output" in capsys.readouterr().out


def test_int_infer_needs_the_qat_stage(digits_cfg):
    with pytest.raises(CheckpointError, match=r"qat/best\.pt not found: run the qat stage first"):
        run_stage(digits_cfg("stage=int_infer"))


def test_a_model_that_fails_the_check_leaves_the_report_and_on_request_the_program(tmp_path):
    torch.manual_seed(0)
    qmodel = calibrate_and_convert(Net(nn.Conv2d(1, 2, 32), nn.ReLU()), [torch.randn(2, 1, 32, 32)])
    x = torch.randn(1, 1, 32, 32)
    with pytest.raises(ModelCheckError, match=r"(?s)conv\.kernel.*report: .*check_report\.txt\)$"):
        check_and_compile(qmodel, x, "bayes", tmp_path / "a")
    assert "kernel [32, 32]" in (tmp_path / "a" / "check_report.txt").read_text()
    assert not (tmp_path / "a" / "model.hir").exists()
    with pytest.raises(ModelCheckError, match="program for diagnosis: .*model.hir"):
        check_and_compile(qmodel, x, "bayes", tmp_path / "b", export_on_failure=True)
    assert torch.equal(backend.load(tmp_path / "b" / "model.hir").run(x), qmodel(x))
