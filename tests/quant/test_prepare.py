"""prepare_qat on zoo models: fusion, BN folding, QAT forward, calibration, explicit fusion, frozen BN."""
import pytest
import torch
from torch import nn

from hat import quant
from hat.models import create_model
from hat.quant.fuse import FusedLayer
from hat.quant.qat import QATConv2d, QATLinear
from hat.integer.profile import J5


def _prepared(name="resnet18", **kw):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kw)
    model.eval()
    qconfig_dict = {"": quant.get_default_qat_qconfig(), "module_name": [("loss", None), ("aux_heads", None)]}
    return model, quant.prepare_qat(model, qconfig_dict)


def test_every_conv_bn_relu_becomes_one_qat_conv_with_the_bn_folded():
    model, qat = _prepared(cifar_stem=True)
    float_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    qat_convs = [m for m in qat.modules() if isinstance(m, QATConv2d)]
    assert len(qat_convs) == float_convs == 20 and all(m.bn is not None for m in qat_convs)
    assert isinstance(qat.head[2], QATLinear)
    assert not any(isinstance(m, nn.BatchNorm2d) for name, m in qat.named_modules() if not name.endswith(".bn"))
    assert model.backbone[0][0] is not qat.backbone[0][0].layer  # a copy: the float model is untouched


def test_calibration_state_reproduces_the_float_model():
    model, qat = _prepared(cifar_stem=True)
    quant.set_fake_quant_state(qat, "calibration")
    qat.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(qat(x), model(x), rtol=1e-3, atol=1e-3)


def test_folded_weights_compute_what_the_eval_mode_layer_computes():
    _, qat = _prepared("convnet_small")
    layer = qat.backbone[1][0]
    layer.bn.running_mean.uniform_(-1, 1)
    layer.bn.running_var.uniform_(0.5, 2)
    layer.bn.weight.data.uniform_(0.5, 1.5)
    quant.set_fake_quant_state(qat, "calibration")
    qat.eval()
    x = torch.randn(2, 16, 8, 8)
    weight, bias = layer.deploy_weight_and_bias()
    expected = torch.relu(torch.nn.functional.conv2d(x, weight, bias, stride=2, padding=1))
    got = layer(quant.QTensor(x, torch.ones(1), "qint8", profile=J5)).dequantize()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_qat_forward_is_quantized_and_trains():
    _, qat = _prepared("mobilenet_v2", width_mult=0.5, cifar_stem=True)
    qat.train()
    loss, logits = qat(torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4]))
    loss.backward()
    assert all(p.grad is not None for p in qat.parameters() if p.requires_grad)
    stem = qat.backbone[0][0]
    values = stem(quant.QTensor(torch.randn(1, 3, 8, 8), torch.ones(1), "qint8", profile=J5))
    steps = values.dequantize() / stem.activation_post_process.scale
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-3)  # outputs lie on the int8 grid


def test_fuse_modules_by_name_and_refusals():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu, self.fc = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Linear(2, 2)

    net = quant.fuse_modules(Net(), [["conv", "bn", "relu"]])
    assert isinstance(net.conv, FusedLayer) and net.conv.activation == "relu" and isinstance(net.bn, nn.Identity)
    with pytest.raises(ValueError, match="no module named bn2"):
        quant.fuse_modules(Net(), [["conv", "bn2"]])
    with pytest.raises(ValueError, match=r"Linear \+ BatchNorm2d \(fc, bn\) is not fusable"):
        quant.fuse_modules(Net(), [["fc", "bn"]])


def test_freeze_bn_stops_statistics_updates():
    _, qat = _prepared("convnet_small")
    quant.freeze_bn(qat)
    qat.train()
    before = qat.backbone[0][0].bn.running_mean.clone()
    qat(torch.randn(8, 1, 8, 8), torch.arange(8))
    assert torch.equal(before, qat.backbone[0][0].bn.running_mean)


def test_module_type_and_member_names_reach_the_fused_layer():
    """module_type (nn.Conv2d) and names of a fused block's bn/relu apply to the fused layer, and the report
    says what prepare_qat does."""
    qc16 = quant.get_default_qat_qconfig(activation_dtype="qint16")
    model = create_model("convnet_small")
    qconfig_dict = {"": quant.get_default_qat_qconfig(), "module_type": [(nn.Conv2d, qc16)],
                    "module_name": [("backbone.2.2", quant.get_default_qat_qconfig()), ("loss", None)]}
    qat = quant.prepare_qat(model, qconfig_dict)
    assert [qat.backbone[i][0].activation_post_process.dtype for i in range(3)] == ["qint16", "qint16", "qint8"]
    rows = {line.split()[0]: line.split()[2] for line in quant.qconfig_report(model, qconfig_dict).splitlines()[1:]}
    assert (rows["backbone.0.0"], rows["backbone.2.0"], rows["backbone.2.2"]) == ("qint16", "qint8", "qint8")


def test_bn_corner_cases_fold_without_nan_or_are_refused():
    model = nn.Sequential(quant.QuantStub(), nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False), nn.ReLU(),
                          nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2), quant.DeQuantStub())
    model[5].weight.data.zero_()  # gamma = 0, as zero_init_residual does
    qat = quant.prepare_qat(model)
    x = torch.randn(2, 1, 5, 5)
    for mode in (True, False):
        assert torch.isfinite(qat.train(mode)(x)).all()
    with pytest.raises(ValueError, match="track_running_stats=False cannot be folded"):
        quant.prepare_qat(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False)))
    with pytest.raises(quant.QuantizationError, match="already prepared"):
        quant.prepare_qat(qat)
    with pytest.raises(ValueError, match=r"qconfig_dict\[''\]: expected a QConfig .* got function"):
        quant.prepare_qat(model, {"": quant.get_default_qat_qconfig})


def test_a_pact_weight_fake_quant_keeps_its_own_fold_and_clip():
    """Only per-channel FakeQuantize/LSQ take the folded-weight shortcut; PACT (a custom weight qconfig) still
    observes its alpha and clips."""
    from hat.quant import (DeQuantStub, PACTFakeQuantize, QConfig, QuantStub, get_default_qat_qconfig, prepare_qat,
                           set_fake_quant_state)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.body = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4))  # fused by prepare_qat

        def forward(self, x):
            return self.dequant(self.body(self.quant(x)))

    qconfig = QConfig(get_default_qat_qconfig().activation, PACTFakeQuantize)
    model = prepare_qat(Net(), {"": qconfig})
    conv = next(m for m in model.modules() if hasattr(m, "weight_fake_quant"))
    set_fake_quant_state(model, "calibration")
    with torch.no_grad():  # the folded range before the forward updates the BN statistics
        expected = float((conv.layer.weight * conv._bn_factor().view(-1, 1, 1, 1)).abs().max())
    model.train()(torch.randn(2, 2, 6, 6))
    assert abs(conv.weight_fake_quant.alpha.item() - expected) < 1e-5
