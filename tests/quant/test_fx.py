"""prepare_qat_fx on plain torchvision models: no code changes, then calibrate and convert."""
import pytest
import torch
import torchvision
from torch import nn

from hat import quant
from hat.quant.qat import QATConv2d, QATFloatFunctional, QATLinear
from hat.quant.quantized import QuantizedConv2d


@pytest.mark.parametrize("ctor,convs,adds", [(torchvision.models.resnet18, 20, 8),
                                             (torchvision.models.mobilenet_v2, 52, 10)],
                         ids=["resnet18", "mobilenet_v2"])
def test_torchvision_models_prepare_calibrate_and_convert(ctor, convs, adds):
    torch.manual_seed(0)
    model = ctor(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    qat = quant.prepare_qat_fx(model, example_inputs=(x,))
    assert sum(isinstance(m, QATConv2d) for m in qat.modules()) == convs  # every conv, each with its BN folded
    assert all(m.bn is not None for m in qat.modules() if isinstance(m, QATConv2d))
    assert sum(isinstance(m, QATFloatFunctional) for m in qat.modules()) == adds  # residual adds rewritten
    assert sum(isinstance(m, QATLinear) for m in qat.modules()) == 1
    quant.set_fake_quant_state(qat, "calibration")
    with torch.no_grad():
        for _ in range(2):
            qat(torch.randn(4, 3, 32, 32))
    quant.set_fake_quant_state(qat, "qat")
    qat.train()
    qat(x).sum().backward()
    assert qat.get_submodule("fc" if ctor is torchvision.models.resnet18 else "classifier.1").layer.weight.grad \
        is not None
    quant.set_fake_quant_state(qat, "validation")
    qmodel = quant.convert_fx(qat.eval())
    assert sum(isinstance(m, QuantizedConv2d) for m in qmodel.modules()) == convs
    with torch.no_grad():
        a, b = qat(x), qmodel(x)
    assert a.shape == b.shape == (4, 10)
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9


def test_example_inputs_are_required():
    with pytest.raises(ValueError, match=r"example_inputs=\(x,\)"):
        quant.prepare_qat_fx(torchvision.models.resnet18())


def test_a_layer_called_twice_is_not_fused_and_alpha_is_refused():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))  # fusing the relu into conv would apply it to both calls

    model, x = Twice().eval(), torch.randn(2, 2, 4, 4)
    qat = quant.prepare_qat_fx(model, example_inputs=(x,))
    quant.set_fake_quant_state(qat, "calibration")
    with torch.no_grad():
        torch.testing.assert_close(qat.eval()(x), model(x), rtol=1e-4, atol=1e-4)

    class Alpha(torch.nn.Module):
        def forward(self, x):
            return torch.add(x, x * 2, alpha=3)

    with pytest.raises(quant.QuantizationError, match=r"add\(\.\.\., alpha=\.\.\.\).*write it with plain operators"):
        quant.prepare_qat_fx(Alpha(), example_inputs=(x,))
    with pytest.raises(ValueError, match="a tuple of the forward's arguments"):
        quant.prepare_qat_fx(Alpha(), example_inputs=x)


class ShiftedSigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return 1 - (self.conv(x).sigmoid() + 1) * 0.5  # each + / - of a number leaves its input's range


def test_adding_a_number_gets_an_observed_scale_instead_of_saturating():
    """sigmoid(x) + 1 lies in [1, 2]: on the sigmoid's grid (|v| <= ~1) it would saturate everywhere."""
    from hat import backend
    from tests.backend.conftest import calibrate_and_convert

    torch.manual_seed(0)
    model, batches = ShiftedSigmoid().eval(), [torch.randn(4, 3, 6, 6) for _ in range(3)]
    qmodel = calibrate_and_convert(model, batches, fx=True)
    with torch.no_grad():
        expected, got = model(batches[1]), qmodel(batches[1])
    assert (got - expected).abs().max() < 0.02
    assert torch.equal(backend.compile(qmodel, (batches[0],), march="bayes").run(batches[1]), got)
