"""convert: integer weights and J5 arithmetic that agree with the QAT model within a quantization step."""
import pytest
import torch
from torch import nn

from hat import quant
from hat.models import create_model
from hat.quant import QTensor
from hat.quant.quantized import QuantizedConv2d, QuantizedFloatFunctional, QuantizedLinear
from hat.quant.qtensor import quantize
from hat.integer.profile import J5


def _calibrated(name="resnet18", **kw):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kw)
    qat = quant.prepare_qat(model, {"": quant.get_default_qat_qconfig(),
                                    "module_name": [("loss", None), ("aux_heads", None),
                                                    ("head.2", quant.get_default_qat_out_qconfig())]})
    quant.set_fake_quant_state(qat, "calibration")
    qat.eval()
    with torch.no_grad():
        for _ in range(3):
            qat(torch.randn(8, *((1, 8, 8) if "convnet" in name else (3, 32, 32))))
    quant.set_fake_quant_state(qat, "validation")
    return qat


def test_quantized_model_computes_in_integers_and_tracks_the_qat_model():
    qat = _calibrated(cifar_stem=True)
    qmodel = quant.convert(qat)
    seen = []
    for module in qmodel.modules():
        if isinstance(module, (QuantizedConv2d, QuantizedFloatFunctional)):
            module.register_forward_hook(lambda m, i, o: seen.append(o.data.dtype))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, got = qat(x), qmodel(x)
    assert set(seen) == {torch.int8} and len(seen) == 28  # 20 convs (stem, 16 in blocks, 3 shortcuts), 8 adds
    assert isinstance(qmodel.backbone[1].add, QuantizedFloatFunctional)
    assert torch.corrcoef(torch.stack([expected.flatten(), got.flatten()]))[0, 1] > 0.99
    assert qat.backbone[0][0].layer.weight is not None and isinstance(qmodel.head[2].weight_int, torch.Tensor)


def test_converted_conv_matches_its_qat_layer_within_one_step():
    qat = _calibrated("convnet_small")
    qmodel = quant.convert(qat)
    layer_qat, layer_q = qat.backbone[1][0], qmodel.backbone[1][0]
    x = torch.randn(2, 16, 8, 8).relu()
    scale = torch.tensor([0.02])
    x_int = quantize(x, scale, "qint8", profile=J5)
    with torch.no_grad():
        reference = layer_qat(QTensor(x_int.data.float() * scale, scale, "qint8", profile=J5)).dequantize()
        got = layer_q(x_int)
    step = float(layer_q.out_scale)
    assert got.data.dtype == torch.int8
    assert (got.dequantize() - reference).abs().max() <= step + 1e-6


def test_integer_bias_is_on_the_accumulator_grid():
    conv = nn.Conv2d(1, 2, 1)
    layer = QuantizedConv2d(conv, torch.ones(2, 1, 1, 1), torch.tensor([0.5, -0.25]), torch.tensor([0.01, 0.02]),
                            torch.tensor([0.1]), "qint8", None, J5)
    assert layer.integer_bias(torch.tensor([0.5])).tolist() == [100, -25]  # 0.5 / (0.5 * 0.01), -0.25 / 0.01
    assert layer.weight_int.flatten().tolist() == [100, 50]


def test_integer_add_follows_the_shift_and_int16_multiplier_form():
    add = QuantizedFloatFunctional(torch.tensor([0.05]), "qint8", profile=J5)
    x = quantize(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.04]), "qint8", profile=J5)
    y = quantize(torch.tensor([0.5, 0.25, -1.0]), torch.tensor([0.01]), "qint8", profile=J5)
    out = add.add(x, y)
    assert out.data.dtype == torch.int8
    torch.testing.assert_close(out.dequantize(), x.dequantize() + y.dequantize(), rtol=0, atol=0.05 / 2 + 1e-6)
    assert torch.equal(add.add(y, x).data, out.data)  # operand order does not matter


@pytest.mark.parametrize("ratio", [1.0, 0.3, 0.01, 0.001])
def test_integer_add_sub_and_add_scalar_match_exact_rounding(ratio):
    """The add keeps a full-width output multiplier: results equal exact half-up rounding of the real sum, but
    for (almost never) a one-step difference from the 16-bit multipliers."""
    torch.manual_seed(0)
    ff = QuantizedFloatFunctional(torch.tensor([0.05]), "qint8", profile=J5)
    x = quantize(torch.randn(5000) * 2, torch.tensor([0.04]), "qint8", profile=J5)
    y = quantize(torch.randn(5000) * 2 * ratio, torch.tensor([0.04 * ratio]), "qint8", profile=J5)
    exact = lambda v: torch.floor(v.double() / 0.05 + 0.5).clamp(-128, 127)  # noqa: E731
    for got, real in [(ff.add(x, y), x.dequantize() + y.dequantize()), (ff.sub(x, y), x.dequantize() - y.dequantize()),
                      (ff.sub(y, x), y.dequantize() - x.dequantize()), (ff.add_scalar(x, 0.37), x.dequantize() + 0.37)]:
        assert (got.data.double() != exact(real)).float().mean() <= 5e-4


def test_high_precision_relu6_and_linear_on_sequences():
    layer = nn.Linear(4, 3)
    lin = QuantizedLinear(layer, torch.ones(3, 4), torch.zeros(3), torch.tensor([0.01, 0.02, 0.04]), None, "qint32",
                          "relu6", J5)
    x = quantize(torch.full((2, 5, 4), 2.0), torch.tensor([0.05]), "qint8", profile=J5)  # (N, L, C) input, L != C
    out = lin(x)
    assert out.dtype == "qint32" and out.data.shape == (2, 5, 3)
    torch.testing.assert_close(out.dequantize(), torch.full((2, 5, 3), 6.0), atol=0.01, rtol=0)  # 8.0 clipped at 6


def test_convert_refuses_an_uncalibrated_model():
    qat = quant.prepare_qat(create_model("convnet_small"))
    with pytest.raises(quant.QuantizationError, match="never observed data.*calibrate first"):
        quant.convert(qat)


def test_constants_far_outside_the_range_saturate_instead_of_wrapping():
    x = quantize(torch.tensor([1.0, -1.0]), torch.tensor([0.01]), "qint8", profile=J5)
    assert (x + 3e7).data.tolist() == [127, 127] and (x - 3e7).data.tolist() == [-128, -128]
    assert torch.nn.functional.hardtanh(x, 0.0, 1e8).data.tolist() == [100, 0]
