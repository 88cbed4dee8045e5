"""float -> calibration -> qat on the digits project, as a user runs them."""
import logging

import pytest
import torch
from omegaconf import OmegaConf

from hat.cli import check_model_main, export_onnx_main, predict_main
from hat.data import build_dataset, build_loader
from hat.engine.quant_stages import prepared_model
from hat.engine.stages import run_stage
from hat.errors import CheckpointError, ConfigError
from tests.conftest import DIGITS


def test_float_calibration_qat_int_infer_keep_float_accuracy(digits_cfg, tmp_path, capsys):
    float_metrics = run_stage(digits_cfg("stage=float"))
    calibrated = run_stage(digits_cfg("stage=calibration"))
    qat = run_stage(digits_cfg("stage=qat"))
    assert float_metrics["val/top1"] >= 97.0
    assert calibrated["val/top1"] >= float_metrics["val/top1"] - 2.0
    assert qat["val/top1"] >= float_metrics["val/top1"] - 0.5
    state = torch.load(tmp_path / "qat" / "best.pt", weights_only=True)
    assert "head.2.weight_fake_quant.scale" in state["model"]
    assert predict_main(["--config", str(DIGITS), "--stage", "qat", f"work_dir={tmp_path}"]) == 0
    # the checkpoint holds its observers switched on (QAT state): predict must evaluate it frozen, as training did
    assert f"qat {tmp_path}/qat/best.pt: val/loss {state['metrics']['val/loss']:.4f}  val/top1 " \
           f"{state['metrics']['val/top1']:.4f}" in capsys.readouterr().out

    integer = run_stage(digits_cfg("stage=int_infer"))  # real digits: the done-when numbers
    assert integer["val/bit_exact_mismatches"] == 0
    assert integer["val/top1"] == integer["val/top1_quantized"]
    assert integer["val/top1"] >= float_metrics["val/top1"] - 0.5
    assert integer["val/agreement_qat_int"] >= 99.5
    table = capsys.readouterr().out
    assert "| integer program | " in table and "(bit-exact)" in table
    written = {p.name for p in (tmp_path / "int_infer").iterdir()}
    assert {"model.hir", "check_report.txt", "summary.md", "metrics.json"} <= written
    assert predict_main(["--config", str(DIGITS), "--stage", "int_infer", f"work_dir={tmp_path}"]) == 0
    assert f"int_infer {tmp_path}/int_infer/model.hir: val/top1 {integer['val/top1']:.4f}" in capsys.readouterr().out
    assert check_model_main(["--config", str(DIGITS), f"work_dir={tmp_path}"]) == 0
    assert f"weights from {tmp_path}/qat/best.pt\ndeployable on bayes" in capsys.readouterr().out

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {stage: EventAccumulator(str(tmp_path / stage / "tb")).Reload().Tags()
            for stage in ("float", "calibration", "qat", "int_infer")}  # every stage writes TensorBoard events
    for stage in ("float", "qat"):
        assert {"train/loss", "val/top1", "hparams/val/top1"} <= set(tags[stage]["scalars"])
    assert {"val/top1", "calibration/range/backbone.0.0", "hparams/val/top1"} <= set(tags["calibration"]["scalars"])
    assert {"calibration/activation_scales", "calibration/weight_scales"} <= set(tags["calibration"]["histograms"])
    assert {"val/top1", "val/top1_qat", "val/top1_quantized", "val/bit_exact_mismatches"} <= \
        set(tags["int_infer"]["scalars"])
    assert "int_infer/accuracy/text_summary" in tags["int_infer"]["tensors"]
    assert {"int_infer/sqnr_db/backbone.0.0", "int_infer/sqnr_db/head.2"} <= set(tags["int_infer"]["scalars"])
    assert "int_infer/layers/text_summary" in tags["int_infer"]["tensors"]
    assert {"float/weights/backbone.0.0.weight", "qat/weights/backbone.0.0.layer.weight"} <= \
        set(tags["float"]["histograms"]) | set(tags["qat"]["histograms"])
    assert {"qat/activation_scales", "qat/weight_scales"} <= set(tags["qat"]["histograms"])
    assert "qat/range/backbone.1.0" in tags["qat"]["scalars"]
    assert "## Per-layer error" in (tmp_path / "int_infer" / "summary.md").read_text()

    # FAQ 2.3 Q3: tools/export_onnx.py for each model kind; onnxruntime keeps the accuracy
    ort = pytest.importorskip("onnxruntime")
    images, labels = (torch.cat(t) for t in zip(*build_loader(build_dataset(digits_cfg().data, "val"),
                                                                digits_cfg().data, train=False, seed=0)))
    accuracy = {"float": float_metrics["val/top1"], "qat": qat["val/top1"], "int_infer": integer["val/top1"]}
    for stage, expected in accuracy.items():
        assert export_onnx_main(["--config", str(DIGITS), "--stage", stage, f"work_dir={tmp_path}"]) == 0
        session = ort.InferenceSession(str(tmp_path / stage / "model.onnx"))
        logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
        assert abs(100.0 * float((torch.from_numpy(logits).argmax(1) == labels).float().mean()) - expected) < 0.6


def test_qat_falls_back_to_sgd_after_an_adaptive_float_recipe(digits_cfg, tmp_path, caplog):
    common = ("optimizer=adamw", "optimizer.lr=0.003", "trainer.epochs=2", "~stages.qat.optimizer")
    run_stage(digits_cfg("stage=float", *common))
    run_stage(digits_cfg("stage=calibration", *common))
    with caplog.at_level(logging.WARNING, logger="hat"):
        run_stage(digits_cfg("stage=qat", *common))
    assert "QAT: the float recipe used AdamW; QAT uses SGD(lr=0.005, momentum=0.9)" in caplog.text
    used = OmegaConf.load(tmp_path / "qat" / "config.yaml")
    assert (used.optimizer.type, used.optimizer.lr, used.scheduler.type) == ("SGD", 0.005, "CosineLR")


def test_qat_keeps_its_own_optimizer_when_stages_qat_sets_one(digits_cfg, tmp_path):
    run_stage(digits_cfg("stage=float", "trainer.epochs=1", "optimizer=adamw", "optimizer.lr=0.003"))
    run_stage(digits_cfg("stage=calibration", "optimizer=adamw"))
    run_stage(digits_cfg("stage=qat", "optimizer=adamw", "stages.qat.trainer.epochs=1"))
    assert OmegaConf.load(tmp_path / "qat" / "config.yaml").optimizer.type == "AdamW"


def test_stage_order_and_config_mistakes(digits_cfg, tmp_path):
    with pytest.raises(CheckpointError, match=r"float/best\.pt not found: run the float stage first"):
        run_stage(digits_cfg("stage=calibration"))
    run_stage(digits_cfg("stage=float", "trainer.epochs=1"))
    with pytest.raises(ConfigError, match=r"quant\.int16_modules\[0\]: no module named 'backbone\.9' in the model; "
                                          r"nearest names: backbone\.2, backbone\.1, backbone\.0"):
        run_stage(digits_cfg("stage=calibration", "quant.int16_modules=[backbone.9]"))
    with pytest.raises(ConfigError, match="quant: activation_dtype must be one of qint8, qint16"):
        run_stage(digits_cfg("stage=calibration", "quant.activation_dtype=qint4"))


@pytest.mark.parametrize("algorithm", ["lsq", "pact"])
def test_learned_range_algorithms_run_end_to_end(digits_cfg, tmp_path, algorithm):
    common = (f"quant.algorithm={algorithm}", "quant.int16_modules=[backbone.1.0]", "stages.qat.trainer.epochs=2")
    float_metrics = run_stage(digits_cfg("stage=float", "trainer.epochs=8", *common))
    run_stage(digits_cfg("stage=calibration", *common))
    qat = run_stage(digits_cfg("stage=qat", *common))
    assert qat["val/top1"] >= float_metrics["val/top1"] - 2.0
    assert run_stage(digits_cfg("stage=int_infer", *common))["val/bit_exact_mismatches"] == 0  # int16 + learned
    state = torch.load(tmp_path / "qat" / "best.pt", weights_only=True)["model"]
    learned = "alpha" if algorithm == "pact" else "scale"
    assert f"backbone.0.0.activation_post_process.{learned}" in state
    prepared = prepared_model(digits_cfg(*common))
    assert prepared.backbone[1][0].activation_post_process.dtype == "qint16"
    assert prepared.backbone[2][0].activation_post_process.dtype == "qint8"


def test_qat_refuses_a_calibration_made_with_another_quant_config(digits_cfg):
    run_stage(digits_cfg("stage=float", "trainer.epochs=1"))
    run_stage(digits_cfg("stage=calibration"))
    with pytest.raises(ConfigError, match=r"the config changed since .*calibration/best\.pt was written "
                                          r"\(quant\.activation_dtype: qint8 -> qint16\).*rerun --stage calibration"):
        run_stage(digits_cfg("stage=qat", "quant.activation_dtype=qint16"))
