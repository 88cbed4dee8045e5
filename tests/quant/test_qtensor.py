"""QTensor ops give the same values in QAT mode (float grid values) and quantized mode (integers)."""
import pytest
import torch
import torch.nn.functional as F

from hat.quant import QTensor, QuantizationError
from hat.quant.qtensor import quantize
from hat.integer.profile import J5

OPS = {
    "relu": lambda t: F.relu(t), "relu_method": lambda t: t.relu(), "relu6": lambda t: F.relu6(t),
    "neg": lambda t: -t, "rsub_1_minus_x": lambda t: 1 - t, "add_eps": lambda t: t + 1e-4, "add_0.3": lambda t: t + 0.3,
    "sub_const": lambda t: t - 0.25, "index": lambda t: t[0], "slice": lambda t: t[:, 1:], "cat": lambda t: torch.cat([t, t], 1),
    "max_pool": lambda t: F.max_pool2d(t, 2), "global_avg": lambda t: F.adaptive_avg_pool2d(t, 1),
    "avg_pool": lambda t: F.avg_pool2d(t, 3), "flatten": lambda t: t.flatten(1), "torch_flatten": lambda t: torch.flatten(t, 1),
    "view": lambda t: t.view(2, -1), "reshape": lambda t: torch.reshape(t, (2, -1)), "permute": lambda t: t.permute(0, 2, 3, 1),
    "mul_2": lambda t: t * 2, "mul_neg": lambda t: -0.5 * t, "div": lambda t: t / 4, "nearest_up": lambda t: F.interpolate(t, scale_factor=2),
}


def _pair(dtype="qint8"):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6) * 2
    scale = torch.tensor([0.05 if dtype == "qint8" else 0.0005])
    quantized = quantize(x, scale, dtype, profile=J5)
    qat = QTensor(quantized.data.float() * scale, scale, dtype, profile=J5)
    return qat, quantized


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
@pytest.mark.parametrize("op", OPS)
def test_qat_and_quantized_modes_agree(op, dtype):
    qat, quantized = _pair(dtype)
    a, b = OPS[op](qat), OPS[op](quantized)
    assert isinstance(a, QTensor) and isinstance(b, QTensor) and a.dtype == b.dtype == dtype
    assert b.data.dtype in (torch.int8, torch.int16) and torch.equal(a.scale, b.scale)
    torch.testing.assert_close(a.dequantize(), b.dequantize(), rtol=0, atol=1e-5)


def test_constants_round_half_up_onto_the_grid_and_saturate():
    x = QTensor(torch.tensor([126, -128, 0], dtype=torch.int8), torch.tensor([0.125]), "qint8", profile=J5)
    assert (x + 0.3125).data.tolist() == [127, -125, 3]  # 2.5 steps -> 3 (half up); 126 + 3 saturates at 127
    assert (-x).data.tolist() == [-126, 127, 0]  # -(-128) saturates
    assert (x + 1e-4).data.tolist() == [126, -128, 0]  # below half a step: no change, as on the device


def test_gradients_flow_through_qat_ops():
    data = torch.tensor([0.1, -0.2, 1.5], requires_grad=True)
    y = (1 - QTensor(data, torch.tensor([0.1]), "qint8", profile=J5)).relu()
    y.dequantize().sum().backward()
    assert data.grad.tolist() == [-1.0, -1.0, 0.0]  # relu(1 - 1.5) = 0: no gradient


def test_two_qtensors_need_a_float_functional():
    qat, _ = _pair()
    for op in (lambda: qat + qat, lambda: qat * qat, lambda: qat - qat):
        with pytest.raises(QuantizationError, match=r"needs an output scale.*self\.f = FloatFunctional\(\)"):
            op()
    with pytest.raises(QuantizationError, match=r"torch.cat.*FloatFunctional"):
        torch.cat([qat, qat * 2])


def test_unsupported_op_lists_what_is_supported():
    qat, _ = _pair()
    with pytest.raises(QuantizationError, match=r"sin is not supported on a QTensor \(it gets the output of module "
                                                r"'.*'\)\. Supported: .*relu"):
        torch.sin(qat)


@pytest.mark.parametrize("call, module", [
    (lambda q: torch.nn.functional.softmax(q, 1), r"nn\.Softmax\(dim=\.\.\.\)"),
    (lambda q: q.log_softmax(1), r"nn\.LogSoftmax"),
    (lambda q: torch.nn.functional.prelu(q, torch.ones(1)), r"nn\.PReLU\(\)"),
    (lambda q: torch.sigmoid(q), r"nn\.Sigmoid\(\)"),
    (lambda q: torch.div(q, q), r"reciprocal"),
])
def test_an_op_that_needs_a_module_names_the_module_to_hold(call, module):
    q = quantize(torch.randn(2, 4), torch.tensor([0.05]), "qint8", profile=J5)
    with pytest.raises(QuantizationError, match=module):
        call(q)


def test_torch_div_by_a_number_scales_like_the_operator():
    q = quantize(torch.randn(2, 4), torch.tensor([0.05]), "qint8", profile=J5)
    assert torch.equal(torch.div(q, 4).dequantize(), (q / 4).dequantize())
    with pytest.raises(QuantizationError, match="rounding_mode='floor'"):
        torch.div(q, 2, rounding_mode="floor")


def test_adding_a_number_that_clips_the_sum_warns_once_per_producer(caplog):
    x = QTensor(torch.rand(100) * 0.9, torch.tensor([1 / 127.5]), "qint8", "head.sigmoid", profile=J5)
    with caplog.at_level("WARNING", logger="hat"):
        x + 1e-3  # on the grid: no clipping to speak of
        assert not caplog.records
        x + 1.0
        x + 1.0
    assert len(caplog.records) == 1
    assert "'head.sigmoid'" in caplog.text and "FloatFunctional.add_scalar" in caplog.text and "100%" in caplog.text
