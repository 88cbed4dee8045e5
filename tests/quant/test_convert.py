"""convert: integer weights and J5 arithmetic that agree with the QAT model within a quantization step."""
import torch
from torch import nn

from hat import quant
from hat.models import create_model
from hat.quant import QTensor
from hat.quant.quantized import QuantizedConv2d, QuantizedFloatFunctional
from hat.quant.qtensor import quantize


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
    assert set(seen) == {torch.int8} and len(seen) == 20  # every conv (stem, 16 in blocks, 3 shortcuts)
    assert isinstance(qmodel.backbone[1].add, QuantizedFloatFunctional)
    assert torch.corrcoef(torch.stack([expected.flatten(), got.flatten()]))[0, 1] > 0.99
    assert qat.backbone[0][0].layer.weight is not None and isinstance(qmodel.head[2].weight_int, torch.Tensor)


def test_converted_conv_matches_its_qat_layer_within_one_step():
    qat = _calibrated("convnet_small")
    qmodel = quant.convert(qat)
    layer_qat, layer_q = qat.backbone[1][0], qmodel.backbone[1][0]
    x = torch.randn(2, 16, 8, 8).relu()
    scale = torch.tensor([0.02])
    x_int = quantize(x, scale, "qint8")
    with torch.no_grad():
        reference = layer_qat(QTensor(x_int.data.float() * scale, scale, "qint8")).dequantize()
        got = layer_q(x_int)
    step = float(layer_q.out_scale)
    assert got.data.dtype == torch.int8
    assert (got.dequantize() - reference).abs().max() <= step + 1e-6


def test_integer_bias_is_on_the_accumulator_grid():
    conv = nn.Conv2d(1, 2, 1)
    layer = QuantizedConv2d(conv, torch.ones(2, 1, 1, 1), torch.tensor([0.5, -0.25]), torch.tensor([0.01, 0.02]),
                            torch.tensor([0.1]), "qint8", None)
    assert layer.integer_bias(torch.tensor([0.5])).tolist() == [100, -25]  # 0.5 / (0.5 * 0.01), -0.25 / 0.01
    assert layer.weight_int.flatten().tolist() == [100, 50]


def test_integer_add_follows_the_shift_and_int16_multiplier_form():
    add = QuantizedFloatFunctional(torch.tensor([0.05]), "qint8")
    x = quantize(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.04]), "qint8")
    y = quantize(torch.tensor([0.5, 0.25, -1.0]), torch.tensor([0.01]), "qint8")
    out = add.add(x, y)
    assert out.data.dtype == torch.int8
    torch.testing.assert_close(out.dequantize(), x.dequantize() + y.dequantize(), rtol=0, atol=0.05 / 2 + 1e-6)
    assert torch.equal(add.add(y, x).data, out.data)  # operand order does not matter
