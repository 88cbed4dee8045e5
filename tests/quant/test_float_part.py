"""quant.float_modules / qconfig None inside a quantized model: the part runs in float (dequantize -> float module ->
observed quantize) through calibration, QAT and the converted model, and the checker says it cannot be deployed."""
import pytest
import torch
from torch import nn

from hat import backend, quant
from hat.backend.j5.checker import ModelCheckError
from hat.engine.stages import run_stage
from hat.models import create_model
from hat.models.classifier import CrossEntropyLoss
from hat.quant import QTensor
from hat.quant.float_part import FloatPart
from hat.quant.quantized import QuantizedQuantStub
from tests.conftest import zoo_model


def _prepared(name, float_module, **kw):
    torch.manual_seed(0)
    if name == "torchvision":  # see tests/engine/test_torchvision_stages.py
        model, shape = create_model(name, num_classes=10, **kw), (3, kw["image_size"], kw["image_size"])
    else:
        model, shape = zoo_model(name, num_classes=10)
    qconfig_dict = {"": quant.get_default_qat_qconfig(),
                    "module_name": [(float_module, None), ("loss", None), ("aux_heads", None)]}
    return quant.prepare_qat(model, qconfig_dict), shape


def _calibrate(qat, shape, batches=3):
    quant.set_fake_quant_state(qat, "calibration")
    qat.eval()
    with torch.no_grad():
        for _ in range(batches):
            qat(torch.randn(8, *shape))
    quant.set_fake_quant_state(qat, "validation")


def test_a_float_conv_in_a_resnet_calibrates_trains_converts_and_is_refused_by_the_checker():
    qat, shape = _prepared("resnet18", "backbone.1.conv1")
    part = qat.backbone[1].conv1
    assert isinstance(part, FloatPart) and part.hat_name == "backbone.1.conv1"
    assert "backbone.1.conv1.module.0.layer.weight" in qat.state_dict()  # the float module one level down
    assert isinstance(qat.loss, CrossEntropyLoss) and isinstance(qat.aux_heads, nn.ModuleList)  # NON_DEPLOY: as is
    _calibrate(qat, shape)

    quant.set_fake_quant_state(qat, "qat")
    qat.train()
    seen = []
    part.register_forward_hook(lambda m, i, o: seen.append((type(i[0]), type(o))))
    loss, _ = qat(torch.randn(8, *shape), torch.randint(0, 10, (8,)))
    loss.backward()
    assert seen == [(QTensor, QTensor)]  # quantized in and out, float in between
    assert part.module[0].layer.weight.grad.abs().sum() > 0

    quant.set_fake_quant_state(qat, "validation")
    qat.eval()
    qmodel = quant.convert(qat)
    assert isinstance(qmodel.backbone[1].conv1.quant, QuantizedQuantStub)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        expected, got = qat(x), qmodel(x)
    assert torch.nn.functional.cosine_similarity(expected.flatten(), got.flatten(), 0) > 0.98

    report = backend.check_model(qmodel.deploy_model(), (x[:1],), march="bayes")
    assert not report.deployable and [f.rule for f in report.findings] == ["float_module"]
    assert report.findings[0].module == "backbone.1.conv1"
    assert "module 'backbone.1.conv1' runs in float" in str(report) and "quant.float_modules" in str(report)
    assert "cannot be compiled" in str(report)


def test_a_fused_member_keeps_its_whole_fused_layer_float():
    qat, shape = _prepared("resnet18", "backbone.1.conv1.1")  # the bn of conv1's conv + bn + relu
    parts = {name for name, m in qat.named_modules() if isinstance(m, FloatPart)}
    assert parts == {"backbone.1.conv1.0"}  # the fused layer, once; its emptied bn/relu slots are not parts
    _calibrate(qat, shape)
    with torch.no_grad():
        assert quant.convert(qat)(torch.randn(2, *shape)).shape == (2, 10)


def test_a_float_hardswish_in_torchvision_mobilenet():
    qat, shape = _prepared("torchvision", "backbone.features.0.2", arch="mobilenet_v3_small", image_size=32)
    part = qat.backbone.get_submodule("features.0.2")
    assert isinstance(part, FloatPart) and isinstance(part.module, nn.Hardswish)
    _calibrate(qat, shape, batches=2)
    qmodel = quant.convert(qat)
    seen = []
    qmodel.backbone.get_submodule("features.0.2").register_forward_hook(
        lambda m, i, o: seen.append((i[0].data.dtype, o.data.dtype)))
    with torch.no_grad():
        assert qmodel(torch.randn(2, *shape)).shape == (2, 10)
    assert seen == [(torch.int8, torch.int8)]


class _FloatFirst(nn.Module):
    """A float module before the QuantStub (float input): the part passes through, as before."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(3, 3, 1)
        self.quant, self.conv, self.dequant = quant.QuantStub(), nn.Conv2d(3, 4, 3), quant.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.conv(self.quant(self.pre(x))))


def test_a_float_part_on_float_input_returns_the_float_output_unchanged_and_still_converts():
    torch.manual_seed(0)
    model = _FloatFirst()
    qat = quant.prepare_qat(model, {"": quant.get_default_qat_qconfig(), "module_name": [("pre", None)]})
    assert isinstance(qat.pre, FloatPart)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(qat.pre(x), model.pre(x), rtol=0, atol=0)
    _calibrate(qat, (3, 8, 8))
    qmodel = quant.convert(qat)  # the unused output quant observed too: no "never observed" refusal
    torch.testing.assert_close(qmodel.pre(x), model.pre(x), rtol=0, atol=0)
    assert [f.rule for f in backend.check_model(qmodel, (x[:1],)).findings] == ["float_module"]


def test_float_modules_in_the_config_run_calibration_and_qat_and_int_infer_names_the_module(digits_cfg, tmp_path):
    fast = ("quant.float_modules=[backbone.1]", "trainer.epochs=1", "stages.qat.trainer.epochs=1",
            "quant.calibration_batches=2")
    float_top1 = run_stage(digits_cfg("stage=float", *fast))["val/top1"]
    assert run_stage(digits_cfg("stage=calibration", *fast))["val/top1"] >= float_top1 - 5.0
    assert run_stage(digits_cfg("stage=qat", *fast))["val/top1"] >= float_top1 - 5.0
    with pytest.raises(ModelCheckError, match=r"module 'backbone\.1' runs in float \(quant\.float_modules"):
        run_stage(digits_cfg("stage=int_infer", *fast))
    assert "cannot be compiled" in (tmp_path / "int_infer" / "check_report.txt").read_text()
