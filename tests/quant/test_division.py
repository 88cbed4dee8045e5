"""Division by a tensor under prepare_qat_fx: a / b becomes a * reciprocal(b) (a reciprocal table and a FloatFunctional
mul), int8 and int16; the program is bit-exact with the quantized model; rounding_mode and eager-mode x / y are
refused with the fix."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hat import backend, quant
from hat.quant.elementwise import QATElementwise
from hat.quant.qat import QATFloatFunctional
from hat.quant.qtensor import QuantizationError

DTYPES = ("qint8", "qint16")


class Ratio(nn.Module):
    """conv(x) / exp(conv2(x)): the denominator lies in about [0.4, 2.5], away from 0."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.conv2.weight.mul_(0.5)

    def forward(self, x):
        return self.conv(x) / torch.exp(self.conv2(x))


def _inputs(seed, batch=4):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _cosine(a, b):
    return float(F.cosine_similarity(a.detach().flatten().double(), b.detach().flatten().double(), dim=0))


def _converted(model, dtype):
    qat = quant.prepare_qat_fx(model, {"": quant.get_default_qat_qconfig(activation_dtype=dtype)},
                               example_inputs=(_inputs(0),))
    quant.set_fake_quant_state(qat, "calibration")
    with torch.no_grad():
        for seed in range(3):
            qat(_inputs(seed))
    quant.set_fake_quant_state(qat, "validation")
    return qat.eval(), quant.convert_fx(qat.eval())


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_division_becomes_a_reciprocal_table_and_a_mul(dtype, tmp_path):
    torch.manual_seed(0)
    model = Ratio().eval()
    qat, qmodel = _converted(model, dtype)
    tables = [m.op.name for m in qat.modules() if isinstance(m, QATElementwise)]
    assert sorted(tables) == ["exp", "reciprocal"]
    assert sum(isinstance(m, QATFloatFunctional) for m in qat.modules()) == 1
    x = _inputs(7)
    with torch.no_grad():
        expected, got = model(x), qmodel(x)
    assert _cosine(got, expected) > 0.98
    assert float((got - expected).norm() / expected.norm()) < 0.2  # magnitudes too, not only the direction
    program = backend.compile(qmodel, (x,), march="bayes")
    assert [n.op for n in program.nodes].count("mul") == 1
    loaded = backend.load(program.save(tmp_path / "m.hir"))
    for batch in (x, x[:1]):
        assert torch.equal(program.run(batch), qmodel(batch)) and torch.equal(loaded.run(batch), qmodel(batch))


def test_every_spelling_of_division_is_rewritten():
    class Spellings(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.conv2 = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            a, b = self.conv(x), torch.exp(self.conv2(x))
            return torch.div(a, b) + torch.true_divide(a, b) + a.div(b) + 2.0 / b + a / 4

    torch.manual_seed(0)
    model = Spellings().eval()
    qat = quant.prepare_qat_fx(model, example_inputs=(_inputs(0),))
    divisions = (operator.truediv, torch.div, torch.true_divide)
    assert not [n for n in qat.graph.nodes if n.target in divisions and isinstance(n.args[1], torch.fx.Node)]
    assert sum(isinstance(m, QATElementwise) and m.op.name == "reciprocal" for m in qat.modules()) == 4
    quant.set_fake_quant_state(qat, "calibration")
    with torch.no_grad():
        for seed in range(3):
            qat(_inputs(seed))
    quant.set_fake_quant_state(qat, "validation")
    qmodel = quant.convert_fx(qat.eval())
    x = _inputs(7)
    assert _cosine(qmodel(x), model(x)) > 0.98
    assert torch.equal(backend.compile(qmodel, (x,)).run(x), qmodel(x))


def test_rounding_mode_is_refused_naming_the_line():
    class Floor(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return torch.div(self.conv(x), torch.exp(x.mean(1, keepdim=True)), rounding_mode="floor")

    with pytest.raises(QuantizationError, match=r"rounding_mode='floor' in test_division\.py:\d+: return torch\.div"):
        quant.prepare_qat_fx(Floor().eval(), example_inputs=(_inputs(0),))


def test_eager_division_of_two_qtensors_says_how_to_fix_it():
    class Eager(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.conv, self.conv2 = quant.QuantStub(), nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            x = self.quant(x)
            return self.conv(x) / self.conv2(x)

    with pytest.raises(QuantizationError, match=r"prepare_qat_fx.*ElementwiseOp\('reciprocal'\).*self\.f\.mul"):
        quant.prepare_qat(Eager())(_inputs(0))
