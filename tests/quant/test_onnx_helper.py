"""FAQ 2.3 Q3: each stage's model exports to ONNX, passes onnx.checker and runs in onnxruntime like in PyTorch."""
import onnx
import pytest
import torch

from hat import quant
from hat.models import create_model
from hat.errors import OnnxExportError
from hat.quant.onnx_helper import export_quantized_onnx, export_to_onnx

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _assert_within_steps(got, expected, step):
    """Mostly equal, else a quantization step or two apart: a rounding that lands on the other side in one layer
    (float sums in another order; ONNX rounds half to even; J5 requantizes with an int16 multiplier and a shift)
    moves that layer's output by a step, and the next layer's by at most about one more."""
    difference = (got - expected).abs() / step
    assert difference.max() <= 2.0001 and difference.mean() < 0.5, (difference.max(), difference.mean())
    assert (got.argmax(1) == expected.argmax(1)).float().mean() > 0.97


def _run(path, x):
    session = ort.InferenceSession(str(path))
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.fixture(scope="module")
def models():
    """digits ConvNet: float, calibrated QAT (int8 logits, so the output has a quantization step), quantized."""
    torch.manual_seed(0)
    float_model = create_model("convnet_small").eval()
    qat = quant.prepare_qat(float_model, {"": quant.get_default_qat_qconfig(), "module_name": [("loss", None)]})
    quant.set_fake_quant_state(qat, "calibration")
    with torch.no_grad():
        qat(torch.randn(256, 1, 8, 8))
    quant.set_fake_quant_state(qat, "validation")
    return float_model, qat.eval(), quant.convert(qat)


def test_float_model_exports_and_matches(models, tmp_path):
    float_model, _, _ = models
    path = export_to_onnx(float_model, torch.randn(2, 1, 8, 8), tmp_path / "float.onnx")
    x = torch.randn(17, 1, 8, 8)  # another batch size than the example's
    torch.testing.assert_close(_run(path, x), float_model(x).detach(), rtol=1e-4, atol=1e-5)


def test_qat_model_exports_fake_quant_as_qdq_pairs(models, tmp_path):
    _, qat, _ = models
    path = export_to_onnx(qat, torch.randn(2, 1, 8, 8), tmp_path / "qat.onnx")
    ops_used = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops_used.count("QuantizeLinear") >= 5 and ops_used.count("DequantizeLinear") >= 5
    x = torch.randn(300, 1, 8, 8)
    with torch.no_grad():
        _assert_within_steps(_run(path, x), qat(x), float(qat.head[2].activation_post_process.scale))
    assert qat.training is False and int(qat.head[2].activation_post_process.observer_enabled) == 0  # left as it was


def test_quantized_model_exports_in_qdq_form(models, tmp_path):
    _, qat, quantized = models
    path = export_quantized_onnx(quantized, torch.randn(2, 1, 8, 8), tmp_path / "quantized.onnx")
    ops_used = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "MatMul"} <= set(ops_used)
    x = torch.randn(300, 1, 8, 8)
    with torch.no_grad():
        _assert_within_steps(_run(path, x), quantized(x), float(qat.head[2].activation_post_process.scale))


def test_a_model_that_cannot_be_traced_says_why(tmp_path):
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # a branch on a tensor's value

    with pytest.raises(OnnxExportError, match="could not be exported to ONNX: .* no Python branch on tensor values"):
        export_to_onnx(Branchy(), torch.randn(2, 3), tmp_path / "b.onnx")


class _GridOps(torch.nn.Module):
    """The ops that keep (or fix) their input's grid and the scalar FloatFunctional ops."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = quant.QuantStub(), quant.DeQuantStub()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.shift, self.scale = quant.FloatFunctional(), quant.FloatFunctional()

    def forward(self, x):
        y = self.conv(self.quant(x))
        y = torch.nn.functional.hardtanh((-y + 0.25).relu(), 0.0, 1.5)  # add_steps (negate, + c), clip
        y = self.scale.mul_scalar(self.shift.add_scalar(y, 0.3), -0.7)
        return self.dequant(torch.nn.functional.interpolate(y, scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_grid_ops_and_scalar_ops_export_within_a_step_of_the_program(dtype, tmp_path):
    """Clip, x + c, -x, nearest resize: exact integer ONNX ops; add_scalar/mul_scalar: float ops on the program's
    own factors. onnxruntime runs with basic graph optimizations: its full level fuses QDQ groups into its own
    integer kernels, which drift by tens of steps (README, ONNX)."""
    from hat import backend
    from tests.backend.conftest import calibrate_and_convert

    torch.manual_seed(0)
    xs = [torch.randn(4, 2, 6, 6) for _ in range(3)]
    qmodel = calibrate_and_convert(_GridOps(), xs, {"": quant.get_default_qat_qconfig(activation_dtype=dtype)})
    path = export_quantized_onnx(qmodel, xs[0], tmp_path / "grid.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: xs[1].numpy()})[0])
    expected = backend.compile(qmodel, (xs[0],), march="bayes").run(xs[1])
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"Clip", "Resize", "Neg"} <= ops
    assert ((got - expected).abs() / float(qmodel.scale.out_scale)).max() <= 1.01  # float32 at int16 steps
