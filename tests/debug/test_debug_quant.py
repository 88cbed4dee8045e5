"""tools/debug_quant.py on the digits project: summary, per-layer similarity, sensitivity (issue 19 item 6)."""
import csv
import json
import subprocess
import sys

import pytest
import torch

from hat.checkpoint import load_checkpoint, save_checkpoint
from hat.debug import layer_precision, model_summary, quantized_layers
from hat.debug.cli import debug_quant_main
from hat.engine.quant_stages import load_quantized_weights, prepared_model
from hat.engine.stages import run_stage
from hat.models import create_model
from hat.quant.fake_quantize import simulated_dtype
from tests.conftest import DIGITS, ROOT

DAMAGED = "backbone.1.0"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """float -> calibration -> qat on digits, and a copy of the QAT checkpoint with one layer's output grid made
    50x coarser (the deliberately damaged layer)."""
    from hat.config import load_config

    work = tmp_path_factory.mktemp("debug")
    for stage in ("float", "calibration", "qat"):
        run_stage(load_config(DIGITS, [f"work_dir={work}", "trainer.progress_bar=false", f"stage={stage}",
                                       "trainer.epochs=6", "stages.qat.trainer.epochs=1"]))
    state = load_checkpoint(work / "qat" / "best.pt")
    state["model"][f"{DAMAGED}.activation_post_process.scale"] *= 50
    save_checkpoint(state, work / "damaged.pt")
    return work


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "debug_quant.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_all_writes_tables_files_and_plots_with_the_users_module_names(trained):
    done = _tool("all", "--config", str(DIGITS), f"work_dir={trained}", "--batches", "2")
    assert done.returncode == 0, done.stderr
    out = trained / "debug"
    for command in ("summary", "similarity", "sensitivity"):
        assert {p.name for p in out.glob(f"{command}.*")} == {f"{command}.{ext}" for ext in ("txt", "csv", "json",
                                                                                                "png")}
        assert (out / f"{command}.png").read_bytes()[:4] == b"\x89PNG"
    similarity = json.loads((out / "similarity.json").read_text())
    layers = [row["layer"] for row in similarity]
    assert layers[:3] == ["quant", "backbone.0.0", "backbone.1.0"]  # the config's names, not "1.0.0"
    convs = [row for row in similarity if row["type"] == "QuantizedConv2d"]
    assert all(row["max err LSB quantized-program"] == 0 for row in convs)  # the program is bit-exact per layer
    assert all(20 < row["SQNR dB float-qat"] < 80 and row["cosine float-qat"] > 0.99 for row in convs)
    assert "first layer under 20 dB" in done.stdout or "every layer keeps >= 20 dB" in done.stdout
    summary = {row["layer"]: row for row in csv.DictReader((out / "summary.csv").open())}
    assert summary["backbone.0.0"]["MACs"] == str(16 * 9 * 8 * 8)  # 16 filters of 3x3x1 at 8x8
    assert summary["head.2"]["params"] == str(64 * 10 + 10)
    assert "total: 24,058 parameters" in (out / "summary.txt").read_text()


def test_sensitivity_ranks_the_damaged_layer_first_and_suggests_it(trained):
    done = _tool("sensitivity", "--config", str(DIGITS), f"work_dir={trained}", "--ckpt", str(trained / "damaged.pt"),
                 "--out", str(trained / "damaged"))
    assert done.returncode == 0, done.stderr
    ranking = json.loads((trained / "damaged" / "sensitivity.json").read_text())
    assert ranking[0]["layer"] == DAMAGED and ranking[0]["gain"] > 0
    assert f"suggested: quant.int16_modules=[{DAMAGED}" in done.stdout


def test_user_errors_are_one_line(trained, tmp_path, capsys):
    assert debug_quant_main(["similarity", "--config", str(DIGITS), f"work_dir={tmp_path}"]) == 2
    assert "no calibration or QAT checkpoint in" in capsys.readouterr().err
    assert debug_quant_main(["sensitivity", "--config", str(DIGITS), f"work_dir={trained}", "--layers", "head.9"]) == 2
    assert "--layers: no module named head.9" in capsys.readouterr().err


def test_layer_precision_changes_one_layer_and_restores_it(digits_cfg, trained):
    cfg = digits_cfg(f"work_dir={trained}")
    model = prepared_model(cfg)
    load_quantized_weights(model, cfg, trained / "damaged.pt", "")
    model.eval()
    names = [name for name, _ in quantized_layers(model)]
    assert names == ["quant", "backbone.0.0", "backbone.1.0", "backbone.2.0", "head.2"]
    layer = dict(quantized_layers(model))[DAMAGED]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 1, 8, 8)
    coarse_scale = layer(model.backbone[0](model.quant(x))).scale.clone()
    with layer_precision(layer, "int16"):
        fine = layer(model.backbone[0](model.quant(x)))
        assert fine.dtype == "qint16" and torch.allclose(fine.scale * 32767.5, coarse_scale * 127.5)
    with layer_precision(layer, "float"):
        assert not layer.activation_post_process.fake_quant_enabled.item()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every scale and flag as before
    assert layer.activation_post_process.dtype == "qint8"
    with pytest.raises(ValueError, match="precision must be one of"):
        with layer_precision(layer, "int4"):
            pass


def test_simulated_dtype_keeps_the_range_on_a_finer_grid():
    from hat.quant.fake_quantize import FakeQuantize

    fq = FakeQuantize()
    fq(torch.linspace(-2, 2, 101))
    fq.observer_enabled.fill_(0)
    x = torch.linspace(-3, 3, 1001)
    with simulated_dtype(fq, "qint16"):
        y = fq(x)
    assert float(y.max()) == pytest.approx(2.0, abs=1e-3)  # clipped at the same range as int8
    assert float((y - x.clamp(-2, 2)).abs().max()) < 1e-4  # 256x finer steps than int8's ~0.016
    assert fq.dtype == "qint8" and float((fq(x) - x.clamp(-2, 2)).abs().max()) > 1e-3


def test_model_summary_counts_parameters_and_macs_of_every_leaf():
    model = create_model("convnet_small")
    summary = model_summary(model.deploy_model(), torch.randn(4, 1, 8, 8))
    assert sum(s.params for s in summary) == sum(p.numel() for p in model.parameters())
    rows = {s.name: s for s in summary}
    assert rows["backbone.1.0"].macs == 32 * 16 * 9 * 4 * 4 and rows["backbone.1.0"].output_shape == [32, 4, 4]
    assert rows["head.2"].macs == 640 and rows["backbone.0.2"].output_elements == 16 * 8 * 8
