"""torchvision architectures whose blocks need the table ops (SiLU, hardswish, hardsigmoid, sigmoid in SE blocks)
run the four stages from projects/digits/torchvision.yaml and end in a bit-exact integer program."""
import pytest

from hat.backend import load
from hat.config import load_config
from hat.engine.stages import run_stage
from tests.conftest import ROOT

CONFIG = ROOT / "projects" / "digits" / "torchvision.yaml"
FAST = ["trainer.progress_bar=false", "trainer.epochs=1", "++stages.qat.trainer.epochs=1",
        "quant.calibration_batches=2", "data.batch_size=32", "+data.train.val_fraction=0.9",
        "+data.val.val_fraction=0.9", "data.val_batch_size=256"]  # 180 training images: the pipeline, not accuracy


def _four_stages(arch, tmp_path):
    cfg = load_config(CONFIG, [f"model.arch={arch}", f"work_dir={tmp_path}", *FAST])
    for stage in ("float", "calibration", "qat"):
        run_stage(cfg, stage)
    metrics = run_stage(cfg, "int_infer")
    assert metrics["val/bit_exact_mismatches"] == 0
    program = load(tmp_path / "int_infer" / "model.hir")
    return {node.op for node in program.nodes}


def test_mobilenet_v3_small_four_stages(tmp_path):
    ops = _four_stages("mobilenet_v3_small", tmp_path)
    assert {"lookup", "mul", "conv2d", "global_avg_pool"} <= ops  # hardswish/hardsigmoid tables, SE scaling


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenet_v3_large", "regnet_y_400mf"])
def test_more_architectures_four_stages(arch, tmp_path):
    assert "lookup" in _four_stages(arch, tmp_path)
