"""Every op of the operator table, int8 and int16 activations: QAT tracks the quantized model, the program is
bit-exact with it (after a .hir round trip too), the checker passes, and the ONNX QDQ form runs in onnxruntime."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hat import backend, quant
from hat.quant.onnx_helper import export_quantized_onnx
from hat.quant.optable import OPS
from hat.quant.qtensor import QuantizationError

POSITIVE = ("log", "sqrt", "rsqrt", "reciprocal")  # ops whose domain is x > 0: fed with (0.05, 4)
DTYPES = ("qint8", "qint16")


class OneOp(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.quant, self.op, self.dequant = quant.QuantStub(), op, quant.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.op(self.quant(x)))


def _inputs(name, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(8, 4, 6, 6, generator=generator)
    return 0.05 + 3.95 * x if name in POSITIVE else 8 * x - 4


def _converted(module, name, dtype):
    qat = quant.prepare_qat(OneOp(module), {"": quant.get_default_qat_qconfig(activation_dtype=dtype)})
    quant.set_fake_quant_state(qat, "calibration")
    with torch.no_grad():
        for seed in range(3):
            qat(_inputs(name, seed))
    quant.set_fake_quant_state(qat, "validation")
    return qat.eval(), quant.convert(qat)


def _cosine(a, b):
    return float(F.cosine_similarity(a.detach().flatten().double(), b.detach().flatten().double(), dim=0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_every_table_op_through_every_stage(op, dtype, tmp_path):
    qat, qmodel = _converted(quant.ElementwiseOp(op.name), op.name, dtype)
    x = _inputs(op.name, seed=7)
    expected = op(x)
    assert _cosine(qat(x), qmodel(x)) > 0.999  # QAT tracks the tables
    assert _cosine(qmodel(x), expected) > 0.99  # and both stay near f (int8 input steps limit 1/x, log x near 0)
    report = backend.check_model(qmodel, (x,))
    assert report.deployable, str(report)
    program = report.program
    assert [n.op for n in program.nodes][1] == ("lookup" if dtype == "qint8" else "segment_lookup")
    loaded = backend.load(program.save(tmp_path / "m.hir"))
    for batch in (x, x[:1]):
        assert torch.equal(loaded.run(batch), qmodel(batch)) and torch.equal(program.run(batch), qmodel(batch))
    ort = pytest.importorskip("onnxruntime")
    path = export_quantized_onnx(qmodel, (x,), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path))
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    step = float(qmodel.op.out_scale)
    difference = (got - qmodel(x)).abs() / step
    if dtype == "qint8":  # the exact table as a Gather: equal unless ONNX's half-even input rounding hits a tie
        assert difference.max() <= 1.0001 and difference.mean() < 0.01
    else:  # f in float, once quantized, vs the segmented tables (within 3.1 LSB of f: benchmarks/RESULTS.md)
        assert difference.max() <= 4.0001 and difference.mean() < 0.5


@pytest.mark.parametrize("module, name", [(nn.SiLU(), "silu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
                                          (nn.LeakyReLU(0.2), "leaky_relu"), (nn.Hardswish(), "hardswish")])
def test_torch_modules_are_taken_as_they_are(module, name):
    qat, qmodel = _converted(module, name, "qint8")
    assert qat.op.op.name == name and qmodel.op.op.name == name
    x = _inputs(name, 3)
    assert _cosine(qmodel(x), module(x)) > 0.999


def test_functional_calls_are_rewritten_by_prepare_qat_fx():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = F.silu(self.conv(x))
            return torch.sigmoid(y) + F.leaky_relu(y, 0.2) + F.gelu(y, approximate="tanh") + y.exp() + y ** 2

    torch.manual_seed(0)
    model, x = Net().eval(), _inputs("silu")
    qat = quant.prepare_qat_fx(model, example_inputs=(x,))
    tables = {name: m.op.name for name, m in qat.named_modules() if type(m).__name__ == "QATElementwise"}
    assert sorted(tables.values()) == ["exp", "gelu_tanh", "leaky_relu", "pow", "sigmoid", "silu"]
    assert dict(qat.named_modules())[next(n for n, v in tables.items() if v == "leaky_relu")].arguments == \
        {"negative_slope": 0.2}
    quant.set_fake_quant_state(qat, "calibration")
    with torch.no_grad():
        qat(x)
    quant.set_fake_quant_state(qat, "validation")
    qmodel = quant.convert_fx(qat)
    assert _cosine(qmodel(x), model(x)) > 0.99
    assert torch.equal(backend.compile(qmodel, (x,)).run(x), qmodel(x))


def test_a_table_function_on_a_qtensor_in_eager_mode_says_to_use_a_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.conv = quant.QuantStub(), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return torch.sigmoid(self.conv(self.quant(x)))

    with pytest.raises(QuantizationError, match=r"sigmoid on a QTensor needs an output scale .* hold nn\.Sigmoid\(\) "
                                                r"in __init__ .* or prepare the model with prepare_qat_fx"):
        quant.prepare_qat(Net())(_inputs("sigmoid"))
