"""Layers beyond a J5 op limit become equivalent legal nodes in the program, bit-exact with the quantized model."""
import pytest
import torch
from torch import nn

from hat import backend, quant
from hat.backend.j5.checker import check_model
from hat.integer.profile import get_profile
from hat.quant import DeQuantStub, QuantStub
from tests.backend.conftest import run_quantized_onnx


class Wide(nn.Module):
    """VGG/AlexNet's first classifier layer in small: a linear over more input channels than J5 takes."""

    def __init__(self, in_features: int, relu: bool = True):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.fc = nn.Linear(in_features, 6)
        self.act = nn.ReLU() if relu else nn.Identity()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.dequant(self.head(self.act(self.fc(self.quant(x)))))


class Patches(nn.Module):
    """ViT-B/32's patch embedding in small: a conv whose 32x32 kernel exceeds J5's 31."""

    def __init__(self, padding: int = 0, in_channels: int = 3, out_channels: int = 5):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.proj = nn.Conv2d(in_channels, out_channels, 32, stride=32, padding=padding)

    def forward(self, x):
        return self.dequant(self.proj(self.quant(x)))


def _compile_exact(qmodel, shape, tmp_path):
    prog = backend.compile(qmodel, example_inputs=(torch.randn(2, *shape),))
    loaded = backend.load(prog.save(tmp_path / "m.hir"))
    for batch in (1, 3):
        x = torch.randn(batch, *shape) * 1.5
        expected = qmodel(x)
        assert torch.equal(prog.run(x), expected) and torch.equal(loaded.run(x), expected)
    return prog


@pytest.mark.parametrize("relu", [True, False])
def test_a_linear_over_more_input_channels_than_the_march_takes_is_split_and_bit_exact(relu, quantized, tmp_path):
    torch.manual_seed(0)
    limit = get_profile("bayes").conv.max_in_channels
    features = 2 * limit + 100  # three partial accumulators
    qmodel = quantized(Wide(features, relu), [torch.randn(4, features) for _ in range(2)])
    prog = _compile_exact(qmodel, [features], tmp_path)
    parts = [n for n in prog.nodes if n.op == "linear" and n.module == "fc"]
    assert len(parts) == 3 and all(prog.tensors[n.params["weight"]["$tensor"]].shape[1] <= limit for n in parts)
    assert [n.op for n in prog.nodes].count("sum_partials") == 1
    assert sum(prog.tensors[n.params["weight"]["$tensor"]].shape[1] for n in parts) == features
    assert sum(t.numel() for t in prog.tensors.values()) < features * 6 + 1000  # the unsplit weight is not kept


@pytest.mark.parametrize("padding", [0, 3])
def test_a_conv_kernel_beyond_the_limit_becomes_space_to_depth_and_bit_exact(padding, quantized, tmp_path):
    torch.manual_seed(0)
    shape = [3, 70, 64]  # 70 rows: the last ones no window reads are cropped
    qmodel = quantized(Patches(padding), [torch.randn(4, *shape) for _ in range(2)])
    prog = _compile_exact(qmodel, shape, tmp_path)
    conv = next(n for n in prog.nodes if n.op == "conv2d")
    assert list(prog.tensors[conv.params["weight"]["$tensor"]].shape) == [5, 12, 16, 16]
    assert conv.params["stride"] == [16, 16] and conv.params["padding"] == [0, 0]


def test_a_layer_that_would_overflow_the_accumulator_stays_whole_and_is_reported(quantized):
    torch.manual_seed(0)
    limit = get_profile("bayes").conv.max_in_channels
    qconfig_dict = {"": quant.get_default_qat_qconfig(),
                    "module_name": [("quant", quant.get_default_qat_qconfig(activation_dtype="qint16"))]}
    qmodel = quantized(Wide(limit + 10), [torch.randn(4, limit + 10) for _ in range(2)], qconfig_dict)
    qmodel.fc.weight_int.fill_(127)  # int16 inputs: sum |w| * 2^15 over 8202 inputs passes 2^31
    report = check_model(qmodel, (torch.randn(2, limit + 10),))
    rules = {f.rule for f in report.findings}
    assert {"linear.in_channels", "accumulator"} <= rules, str(report)


def test_legal_layers_are_left_as_they_are(quantized):
    torch.manual_seed(0)
    qmodel = quantized(Wide(64, relu=False), [torch.randn(4, 64) for _ in range(2)])
    prog = backend.compile(qmodel, example_inputs=(torch.randn(2, 64),))
    assert [n.op for n in prog.nodes] == ["quantize", "linear", "linear", "dequantize"]


@pytest.mark.parametrize("model, shape", [(Wide(get_profile("bayes").conv.max_in_channels + 8), [8200]),
                                          (Patches(), [3, 64, 64])], ids=["split", "space_to_depth"])
def test_legalized_programs_export_to_onnx(model, shape, quantized, tmp_path):
    torch.manual_seed(0)
    qmodel = quantized(model, [torch.randn(4, *shape) for _ in range(2)])
    x = torch.randn(3, *shape)
    prog = backend.compile(qmodel, example_inputs=(x,))
    assert {"sum_partials", "layout"} & {n.op for n in prog.nodes}
    step = prog.values[prog.nodes[-1].inputs[0]].scale[0]
    steps = (run_quantized_onnx(qmodel, x, tmp_path) - prog.run(x)).abs() / step
    assert float(steps.max()) <= 2.01  # ONNX: half-even rounding and float requantization, a step or two off
