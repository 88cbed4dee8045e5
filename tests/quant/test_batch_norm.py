"""A batch norm that no conv/linear precedes (a BN after a relu, DenseNet's pre-activation BN -> ReLU -> conv, timm's
BatchNormAct2d, a BN after an add) becomes a depthwise 1x1 conv with the BN folded in: it trains (gamma/beta get
gradients, the running statistics update, the unit weight stays a constant), QAT tracks the quantized model, the
program is bit-exact with it (after a .hir round trip too), the checker passes and the ONNX QDQ form runs in
onnxruntime; int8 and int16 activations."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hat import backend, quant
from hat.quant.batch_norm import QATBatchNorm2d
from hat.quant.fx import quant_friendly
from hat.quant.onnx_helper import export_quantized_onnx
from hat.quant.qtensor import QuantizationError
from hat.quant.quantized import QuantizedConv2d
from tests.backend.conftest import calibrate, calibrate_and_convert

DTYPES = ("qint8", "qint16")
CHANNELS = 6


def _inputs(seed, batch=4, size=8):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _cosine(a, b):
    return float(F.cosine_similarity(a.detach().flatten().double(), b.detach().flatten().double(), dim=0))


def _trained_statistics(bn: nn.Module, seed: int) -> nn.Module:
    """Statistics and affine parameters as a float training leaves them (one gamma negative: a -127 weight)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 0.5)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
        bn.weight[1] = -bn.weight[1]
        bn.bias.copy_(torch.randn(bn.num_features, generator=generator) * 0.2)
    return bn


def after_relu():
    """QuantStub -> conv -> relu -> BatchNorm2d -> relu -> conv -> DeQuantStub, an nn.Sequential (BN + relu fuse)."""
    torch.manual_seed(0)
    return nn.Sequential(quant.QuantStub(), nn.Conv2d(3, CHANNELS, 3, padding=1), nn.ReLU(),
                         _trained_statistics(nn.BatchNorm2d(CHANNELS), 1), nn.ReLU(), nn.Conv2d(CHANNELS, 4, 1),
                         quant.DeQuantStub())


class PreActivation(nn.Module):
    """DenseNet's layer: BN -> ReLU -> conv on the quantized input, then BN -> ReLU -> conv after a max pool."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.quant, self.dequant = quant.QuantStub(), quant.DeQuantStub()
        self.norm1, self.relu1, self.conv1 = _trained_statistics(nn.BatchNorm2d(3), 2), nn.ReLU(), nn.Conv2d(3, 6, 3)
        self.norm2, self.relu2, self.conv2 = _trained_statistics(nn.BatchNorm2d(6), 3), nn.ReLU(), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.conv1(self.relu1(self.norm1(self.quant(x))))
        return self.dequant(self.conv2(self.relu2(self.norm2(F.max_pool2d(y, 2)))))


def _check_program(qmodel, x, tmp_path, onnx=True):
    report = backend.check_model(qmodel, (x,))
    assert report.deployable, str(report)
    depthwise = [n for n in report.program.nodes if n.op == "conv2d" and n.params["groups"] > 1]
    assert depthwise, [n.op for n in report.program.nodes]  # each batch norm is a depthwise conv2d
    compiled = backend.compile(qmodel, (x,), march="bayes")
    loaded = backend.load(compiled.save(tmp_path / "m.hir"))
    for batch in (x, x[:1]):
        reference = qmodel(batch)
        assert torch.equal(compiled.run(batch), reference) and torch.equal(loaded.run(batch), reference)
    if not onnx:
        return
    ort = pytest.importorskip("onnxruntime")
    path = export_quantized_onnx(qmodel, (x,), tmp_path / "m.onnx")
    options = ort.SessionOptions()  # basic optimizations: see test_prelu.py (ORT's u8s8 conv saturates without VNNI)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options)
    onnx_out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert _cosine(onnx_out, qmodel(x)) > 0.999  # float requantization and half-even rounding in ONNX


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("build, norms", [(after_relu, ["3"]), (PreActivation, ["norm1", "norm2"])],
                         ids=["after_relu", "pre_activation"])
def test_standalone_batch_norm_trains_and_is_bit_exact(build, norms, dtype, tmp_path):
    qat = quant.prepare_qat(build(), {"": quant.get_default_qat_qconfig(activation_dtype=dtype)})
    layers = [qat.get_submodule(name) for name in norms]
    assert all(type(layer) is QATBatchNorm2d and layer.layer.groups == layer.bn.num_features for layer in layers)
    if build is after_relu:  # the nn.Sequential's BN + ReLU fused: the relu is the conv's clip
        assert layers[0].activation == "relu" and isinstance(qat.get_submodule("4"), nn.Identity)
    for layer in layers:  # the unit weight is a constant: no parameter, not in the state_dict
        assert "weight" in dict(layer.layer.named_buffers()) and not list(layer.layer.parameters())
    assert all(f"{name}.bn.weight" in qat.state_dict() and f"{name}.layer.weight" not in qat.state_dict()
               for name in norms)

    quant.set_fake_quant_state(qat, "calibration")
    qat.eval()
    with torch.no_grad():
        for seed in range(3):
            qat(_inputs(seed))

    quant.set_fake_quant_state(qat, "qat")  # one QAT step, train mode: batch statistics
    qat.train()
    before = [(layer.bn.weight.detach().clone(), layer.bn.running_mean.clone()) for layer in layers]
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.1)
    x = _inputs(5)
    loss = (qat(x) - 1.0).pow(2).mean()
    loss.backward()
    optimizer.step()
    for layer, (weight, running_mean) in zip(layers, before):
        assert layer.bn.weight.grad is not None and float(layer.bn.weight.grad.abs().sum()) > 0
        assert not torch.equal(layer.bn.weight.detach(), weight)  # gamma trained
        assert not torch.equal(layer.bn.running_mean, running_mean)  # running statistics updated
        assert torch.equal(layer.layer.weight, torch.ones_like(layer.layer.weight))  # the identity stays one

    quant.set_fake_quant_state(qat, "validation")
    qat.eval()
    qmodel = quant.convert(qat)
    assert all(type(qmodel.get_submodule(name)) is QuantizedConv2d for name in norms)
    x = _inputs(7)
    with torch.no_grad():
        assert _cosine(qat(x), qmodel(x)) > 0.99
    _check_program(qmodel, x, tmp_path, onnx=True)  # int16 max pool: exported through float (ONNX has no int16)


def test_every_channel_weight_is_127_steps():
    """Per-channel scale: the folded gamma / std of each channel is +-127 steps whatever its value."""
    qmodel = calibrate_and_convert(PreActivation().eval(), [_inputs(seed) for seed in range(2)])
    weight = qmodel.norm2.weight_int.flatten()
    assert torch.equal(weight.abs(), torch.full_like(weight, 127)) and int(weight[1]) == -127
    bn = PreActivation().norm2
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(qmodel.norm2.weight_scale * 127.5, factor.abs())


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: an nn.BatchNorm2d subclass whose forward calls F.batch_norm, then its activation."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.drop, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        assert x.ndim == 4, f"expected 4D input (got {x.ndim}D input)"
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        bn_training = True if self.training else (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, momentum, self.eps)
        return self.act(self.drop(x))


class TimmStyle(nn.Module):
    """BatchNormAct2d after a conv (folded into it) and after an add (the standalone op)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, CHANNELS, 3, padding=1), _trained_statistics(BatchNormAct2d(CHANNELS), 4)
        self.conv2 = nn.Conv2d(3, CHANNELS, 1)
        self.bn2 = _trained_statistics(BatchNormAct2d(CHANNELS), 5)
        self.head = nn.Conv2d(CHANNELS, 4, 1)

    def forward(self, x):
        return self.head(self.bn2(self.bn1(self.conv1(x)) + self.conv2(x)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_timm_batch_norm_act_through_prepare_qat_fx(dtype, tmp_path):
    model, x = TimmStyle().eval(), _inputs(0)
    qat = quant.prepare_qat_fx(model, {"": quant.get_default_qat_qconfig(activation_dtype=dtype)},
                               example_inputs=(x,))
    # after the conv: folded into it with the relu; after the add: the standalone op, relu fused, keys as timm's
    assert qat.conv1.bn is not None and qat.conv1.activation == "relu" and type(qat.conv1).__name__ == "QATConv2d"
    assert type(qat.bn2) is QATBatchNorm2d and qat.bn2.activation == "relu"
    assert type(qat.bn2.bn) is nn.BatchNorm2d and "bn2.bn.running_var" in qat.state_dict()
    quant.set_fake_quant_state(qat, "qat")
    qat.train()
    qat(x).sum().backward()
    assert qat.bn2.bn.weight.grad is not None and qat.conv1.bn.weight.grad is not None
    with torch.no_grad():  # the rewritten float graph computes what the model computes
        torch.testing.assert_close(quant_friendly(model, (x,))(x), model(x), rtol=1e-5, atol=1e-5)

    batches = [_inputs(seed) for seed in range(2)]
    qmodel = calibrate_and_convert(model, batches, {"": quant.get_default_qat_qconfig(activation_dtype=dtype)},
                                   fx=True)
    x = _inputs(9)
    with torch.no_grad():
        assert _cosine(qmodel(x), model(x)) > 0.99
    _check_program(qmodel, x, tmp_path)


def test_batch_norm_1d_standalone_and_fused_relu(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.quant, self.dequant = quant.QuantStub(), quant.DeQuantStub()
            self.block = nn.Sequential(_trained_statistics(nn.BatchNorm1d(3 * 8 * 8), 6), nn.ReLU())
            self.fc = nn.Linear(3 * 8 * 8, 5)

        def forward(self, x):
            return self.dequant(self.fc(self.block(self.quant(x).flatten(1))))

    qmodel = calibrate_and_convert(Net().eval(), [_inputs(seed) for seed in range(2)])
    x = _inputs(3)
    report = backend.check_model(qmodel, (x,))
    assert report.deployable, str(report)
    assert [n.op for n in report.program.nodes] == ["quantize", "layout", "layout", "layout", "conv2d", "layout",
                                                    "linear", "dequantize"]
    compiled = backend.compile(qmodel, (x,))
    for batch in (x, x[:1]):
        assert torch.equal(compiled.run(batch), qmodel(batch))


def test_refusals():
    with pytest.raises(QuantizationError, match="BatchNormAct2d subclasses nn.BatchNorm2d and overrides forward"):
        quant.prepare_qat(nn.Sequential(quant.QuantStub(), BatchNormAct2d(3)))
    with pytest.raises(QuantizationError, match="track_running_stats=False"):
        quant.prepare_qat(nn.Sequential(quant.QuantStub(), nn.BatchNorm2d(3, track_running_stats=False)))

    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return F.batch_norm(x, self.bn.running_mean * 2, self.bn.running_var, training=False)

    with pytest.raises(QuantizationError, match=r"F.batch_norm in test_batch_norm\.py:\d+"):
        quant.prepare_qat_fx(Computed().eval(), example_inputs=(_inputs(0),))


@pytest.mark.slow  # 6 s on an idle 2-core machine, over 20 s under load
def test_densenet121_prepare_calibrate_convert_bit_exact():
    """torchvision's DenseNet: pre-activation norm -> relu -> conv in every layer and transition, norm5 -> F.relu."""
    torch.manual_seed(0)
    model = torchvision.models.get_model("densenet121", weights=None, num_classes=10).eval()
    batches = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) for seed in range(2)]
    qat = quant.prepare_qat_fx(model, example_inputs=(batches[0],))
    standalone = [m for m in qat.modules() if type(m) is QATBatchNorm2d]
    # every dense layer's norm1, every transition's norm and norm5 (norm0 follows conv0: folded into it), each with
    # its relu fused
    assert len(standalone) == 58 + 3 + 1 and all(m.activation == "relu" for m in standalone)
    qmodel = quant.convert(calibrate(qat, batches))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert _cosine(qat(x), qmodel(x)) > 0.99
    report = backend.check_model(qmodel, (x,))
    assert report.deployable, str(report)
    assert torch.equal(report.program.run(x), qmodel(x))
