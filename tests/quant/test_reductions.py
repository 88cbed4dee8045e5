"""mean/sum over dims (the SE pattern), clamp with constants and maximum/minimum of two activations: QAT and
quantized agree, and the program is bit-exact with the quantized model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hat import backend, quant
from hat.quant.qtensor import QuantizationError


class SE(nn.Module):
    """A squeeze-excitation block as timm writes it (mean, not a pooling module), plus clamp/maximum/sum."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        y = y * scale
        z = torch.maximum(y, self.conv2(y)).clamp(-1.0, 2.5)
        return z.sum(dim=1, keepdim=True) + torch.minimum(z, y)


def test_se_block_mean_clamp_extrema_are_bit_exact():
    torch.manual_seed(0)
    model, x = SE().eval(), torch.randn(4, 3, 8, 8)
    qat = quant.prepare_qat_fx(model, example_inputs=(x,))
    quant.set_fake_quant_state(qat, "calibration")
    with torch.no_grad():
        for _ in range(3):
            qat(torch.randn(4, 3, 8, 8))
    quant.set_fake_quant_state(qat, "validation")
    qmodel = quant.convert_fx(qat)
    cosine = F.cosine_similarity(qat(x).flatten(), qmodel(x).flatten(), dim=0)
    assert cosine > 0.999 and F.cosine_similarity(model(x).flatten(), qmodel(x).flatten(), dim=0) > 0.98
    program = backend.compile(qmodel, (x,))
    assert {"mean", "extremum", "clip", "lookup", "mul"} <= {n.op for n in program.nodes}
    assert torch.equal(program.run(x), qmodel(x)) and torch.equal(program.run(x[:1]), qmodel(x[:1]))


def test_mean_over_the_batch_dim_is_refused():
    qat = quant.prepare_qat(nn.Sequential(quant.QuantStub(), nn.Conv2d(3, 3, 1)))
    with pytest.raises(QuantizationError, match="mean over the batch dim of a QTensor"):
        qat(torch.randn(2, 3, 4, 4)).mean()
