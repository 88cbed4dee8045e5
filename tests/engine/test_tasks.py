"""Detection and segmentation through the real project configs: every stage, their metrics, a bit-exact program."""
import json

import pytest
import torch
from PIL import Image

from hat import backend
from hat.cli import export_onnx_main, predict_main
from hat.config import load_config
from hat.engine.stages import run_stage
from hat.errors import ConfigError
from tests.conftest import ROOT

FCOS = ROOT / "projects" / "detection" / "fcos_digits.yaml"
UNET = ROOT / "projects" / "segmentation" / "unet_digits.yaml"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return tmp_path_factory.mktemp("scenes")


def _cfg(config, tmp_path, scenes, *overrides):
    return load_config(config, [f"work_dir={tmp_path}", "trainer.progress_bar=false", f"data.train.root={scenes}",
                                "data.train.scenes.num_train=48", "data.train.scenes.num_val=16",
                                "quant.calibration_batches=2", "data.batch_size=16", "trainer.log_interval=2", *overrides])


def _all_stages(config, tmp_path, scenes, float_epochs=2):
    float_metrics = run_stage(_cfg(config, tmp_path, scenes, "stage=float", f"trainer.epochs={float_epochs}"))
    run_stage(_cfg(config, tmp_path, scenes, "stage=calibration"))
    qat = run_stage(_cfg(config, tmp_path, scenes, "stage=qat", "stages.qat.trainer.epochs=1"))
    return float_metrics, qat, run_stage(_cfg(config, tmp_path, scenes, "stage=int_infer"))


def test_fcos_runs_every_stage_into_a_bit_exact_multi_output_program(tmp_path, scenes, capsys):
    float_metrics, qat, integer = _all_stages(FCOS, tmp_path, scenes)
    assert {"val/loss", "val/mAP", "val/mAP50"} <= set(float_metrics) and "val/top1" not in float_metrics
    assert {"val/mAP", "val/mAP50"} <= set(qat)
    assert integer["val/bit_exact_mismatches"] == 0
    assert integer["val/mAP"] == integer["val/mAP_quantized"] and integer["val/mAP50"] == integer["val/mAP50_quantized"]
    assert "val/mAP_qat" in integer and "val/agreement_qat_int" not in integer
    saved = json.loads((tmp_path / "int_infer" / "metrics.json").read_text())
    assert saved["val/mAP"] == integer["val/mAP"]
    table = capsys.readouterr().out
    assert "| model | mAP % | mAP50 % |" in table and "(bit-exact)" in table

    program = backend.load(tmp_path / "int_infer" / "model.hir")  # named outputs, in the head's order
    assert program.output_names == [f"{b}_s{s}" for s in (4, 8, 16) for b in ("cls", "box", "ctr")]
    outputs = program.run(torch.zeros(2, 1, 64, 64))
    assert list(outputs) == program.output_names and outputs["box_s8"].shape == (2, 4, 8, 8)

    overrides = [f"work_dir={tmp_path}", f"data.train.root={scenes}", "data.train.scenes.num_train=48",
                 "data.train.scenes.num_val=16"]
    assert predict_main(["--config", str(FCOS), "--stage", "int_infer", "--draw", "3", "--profile", *overrides]) == 0
    out = capsys.readouterr().out
    assert f"val/mAP {integer['val/mAP']:.4f}" in out
    assert "integer program, batch" in out and "GMAC" in out  # --profile: one line per op, slowest first
    conv_lines = [line for line in out.splitlines() if " conv2d " in line]
    assert conv_lines and all("int8 GEMM" in line or "exact float" in line for line in conv_lines)
    drawn = sorted((tmp_path / "int_infer" / "predictions").iterdir())
    assert [p.name for p in drawn] == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(drawn[0]).size == (64, 64) and Image.open(drawn[0]).mode == "RGB"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "qat" / "tb")).Reload()
    assert "val/predictions" in events.Tags()["images"] and "train/loss_box" in events.Tags()["scalars"]

    ort = pytest.importorskip("onnxruntime")  # the deploy model's ONNX keeps the outputs and their names
    for stage in ("float", "int_infer"):
        assert export_onnx_main(["--config", str(FCOS), "--stage", stage, *overrides]) == 0
        session = ort.InferenceSession(str(tmp_path / stage / "model.onnx"))
        assert [o.name for o in session.get_outputs()] == program.output_names


def test_unet_runs_every_stage_with_miou(tmp_path, scenes):
    float_metrics, qat, integer = _all_stages(UNET, tmp_path, scenes)
    assert {"val/mIoU", "val/pixel_acc"} <= set(float_metrics)
    assert integer["val/bit_exact_mismatches"] == 0
    assert integer["val/mIoU"] == integer["val/mIoU_quantized"]
    assert 0.0 <= integer["val/mIoU"] <= 100.0
    assert json.loads((tmp_path / "float" / "metrics.json").read_text())["val/mIoU"] == float_metrics["val/mIoU"]


def test_best_checkpoint_follows_the_configured_metric_and_mode(tmp_path, scenes):
    run_stage(_cfg(UNET, tmp_path, scenes, "trainer.epochs=2", "trainer.best_metric=val/loss", "trainer.best_mode=min"))
    best = torch.load(tmp_path / "float" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "float" / "last.pt", weights_only=True)
    assert best["best_metric"] == min(best["metrics"]["val/loss"], last["metrics"]["val/loss"])


def test_a_best_metric_the_evaluator_does_not_give_is_a_clear_error(tmp_path, scenes):
    with pytest.raises(ConfigError, match="trainer.best_metric: 'val/top1' is not among the validation metrics "
                                          r"\(val/loss, val/mIoU, val/pixel_acc\)"):
        run_stage(_cfg(UNET, tmp_path, scenes, "trainer.epochs=1", "trainer.best_metric=val/top1"))
    with pytest.raises(ConfigError, match="trainer.best_mode must be max or min"):
        _cfg(UNET, tmp_path, scenes, "trainer.best_mode=lowest")
