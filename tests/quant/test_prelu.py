"""PReLU (one slope or one per channel), int8 and int16 activations: the slope trains in QAT, QAT tracks the
quantized model, the program is bit-exact with it (after a .hir round trip too), the checker passes, the ONNX QDQ
form runs in onnxruntime; prepare_qat_fx takes F.prelu with a parameter the model holds."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hat import backend, quant
from hat.integer import kernels
from hat.quant.onnx_helper import export_quantized_onnx
from hat.quant.prelu import QATPReLU, QuantizedPReLU
from hat.quant.qtensor import QuantizationError

DTYPES = ("qint8", "qint16")
CHANNELS = 4
SLOPES = {1: [-0.3], CHANNELS: [0.25, -0.5, 1.5, 0.0]}  # negative, > 1 and 0 slopes: the multiplier is signed


class ConvPReLU(nn.Module):
    def __init__(self, num_parameters):
        super().__init__()
        self.quant, self.conv = quant.QuantStub(), nn.Conv2d(3, CHANNELS, 3, padding=1)
        self.act, self.dequant = nn.PReLU(num_parameters), quant.DeQuantStub()
        with torch.no_grad():
            self.act.weight.copy_(torch.tensor(SLOPES[num_parameters]))

    def forward(self, x):
        return self.dequant(self.act(self.conv(self.quant(x))))


def _inputs(seed, batch=4):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _cosine(a, b):
    return float(F.cosine_similarity(a.detach().flatten().double(), b.detach().flatten().double(), dim=0))


def _calibrated(model, dtype, fx=False):
    qconfig = {"": quant.get_default_qat_qconfig(activation_dtype=dtype)}
    qat = quant.prepare_qat_fx(model, qconfig, example_inputs=(_inputs(0),)) if fx else quant.prepare_qat(model,
                                                                                                          qconfig)
    quant.set_fake_quant_state(qat, "calibration")
    qat.eval()
    with torch.no_grad():
        for seed in range(3):
            qat(_inputs(seed))
    return qat


def _train_step(qat, slope):
    """One QAT step; returns how far it moved `slope`."""
    quant.set_fake_quant_state(qat, "qat")
    qat.train()
    before = slope.detach().clone()
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.1)
    x = _inputs(5)
    loss = (qat(x) - 2 * x[:, :1]).pow(2).mean()  # any target that the slopes influence
    loss.backward()
    optimizer.step()
    quant.set_fake_quant_state(qat, "validation")
    return float((slope.detach() - before).abs().max())


@pytest.mark.parametrize("num_parameters", [1, CHANNELS], ids=["one_slope", "per_channel"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prelu_through_every_stage(dtype, num_parameters, tmp_path):
    torch.manual_seed(0)
    qat = _calibrated(ConvPReLU(num_parameters), dtype)
    assert isinstance(qat.act, QATPReLU) and qat.act.weight.shape == (num_parameters,)
    assert _train_step(qat, qat.act.weight) > 0  # the slope is a trained parameter
    qmodel = quant.convert(qat.eval())
    assert isinstance(qmodel.act, QuantizedPReLU)
    torch.testing.assert_close(qmodel.act.weight, qat.act.weight.detach())

    x = _inputs(7)
    with torch.no_grad():
        expected, got = qat(x), qmodel(x)
    step = float(qmodel.act.out_scale)
    assert _cosine(expected, got) > 0.99
    assert float((expected - got).abs().max()) <= 2 * step + 1e-6  # conv rounding + the prelu's own rounding

    report = backend.check_model(qmodel, (x,))
    assert report.deployable, str(report)
    program = report.program
    assert [n.op for n in program.nodes] == ["quantize", "conv2d", "prelu", "dequantize"]
    loaded = backend.load(program.save(tmp_path / "m.hir"))
    compiled = backend.compile(qmodel, (x,), march="bayes")
    for batch in (x, x[:1]):
        reference = qmodel(batch)
        assert torch.equal(compiled.run(batch), reference) and torch.equal(loaded.run(batch), reference)

    ort = pytest.importorskip("onnxruntime")
    path = export_quantized_onnx(qmodel, (x,), tmp_path / "m.onnx")
    # Basic graph optimizations: the extended ones fuse the int8 conv into ORT's u8s8 QLinearConv, whose int16
    # pair sums saturate on CPUs without VNNI (a conv alone is then up to ~20 steps off); the graph is not at fault
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options)
    onnx_out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    difference = (onnx_out - qmodel(x)).abs() / step  # float requantization and half-even rounding, twice
    assert float(difference.max()) <= 3.0001 and float(difference.mean()) < 0.25


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_is_the_piecewise_linear_map(dtype):
    """Every input integer: x >= 0 and x < 0 each requantized by its own signed multiplier, per channel."""
    low, high = torch.iinfo(torch.int8 if dtype == "qint8" else torch.int16).min, 127 if dtype == "qint8" else 32767
    x = torch.arange(low, high + 1).to(torch.int8 if dtype == "qint8" else torch.int16).reshape(1, 1, -1, 1)
    x = x.expand(1, 2, -1, 1)
    out = kernels.prelu(x, pos_multiplier=3, pos_shift=2, neg_multiplier=torch.tensor([-5, 7]),
                        neg_shift=torch.tensor([3, 1]), channel_axis=1, out_dtype=dtype)
    v = x.long()
    half_up = lambda a, n: torch.floor(a / 2 ** n + 0.5).long()  # noqa: E731
    want = torch.where(v >= 0, half_up(v * 3, 2), torch.stack([half_up(v[:, 0] * -5, 3), half_up(v[:, 1] * 7, 1)],
                                                              1))
    assert torch.equal(out.long(), want.clamp(low, high))


def test_functional_prelu_is_rewritten_by_prepare_qat_fx_and_keeps_training(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, CHANNELS, 3, padding=1)
            self.slope = nn.Parameter(torch.tensor([0.2, -0.1, 0.7, 0.05]))

        def forward(self, x):
            return F.prelu(self.conv(x), self.slope)

    torch.manual_seed(0)
    model = Net().eval()
    qat = _calibrated(model, "qint8", fx=True)
    prelus = [m for m in qat.modules() if isinstance(m, QATPReLU)]
    assert len(prelus) == 1 and prelus[0].weight is qat.slope  # the model's parameter, shared
    assert _train_step(qat, qat.slope) > 0
    qmodel = quant.convert_fx(qat.eval())
    x = _inputs(9)
    assert _cosine(qmodel(x), qat(x)) > 0.99
    assert torch.equal(backend.compile(qmodel, (x,)).run(x), qmodel(x))


def test_functional_prelu_with_a_weight_computed_in_forward_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, CHANNELS, 1)
            self.slope = nn.Parameter(torch.full((CHANNELS,), 0.1))

        def forward(self, x):
            return F.prelu(self.conv(x), self.slope * 2)

    with pytest.raises(QuantizationError, match=r"prelu in test_prelu\.py:\d+.*weight computed in forward"):
        quant.prepare_qat_fx(Net().eval(), example_inputs=(_inputs(0),))
