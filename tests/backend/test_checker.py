"""check_model: one model per rule that breaks it, and the message it gets (module, limit, value, fix)."""
import pytest
import torch
from torch import nn

from hat import backend, quant
from hat.backend.j5.checker import Finding, ModelCheckError, _grid_sample_findings, tensor_findings
from hat.integer.profile import J5
from hat.backend.j5.program import Node, Program, Value
from hat.quant import DeQuantStub, FloatFunctional, QuantStub
from hat.quant.functional import grid_sample
from tests.backend.conftest import calibrate_and_convert


class Net(nn.Module):
    """quant -> `layers` in order (called through `route`, default a chain) -> dequant."""

    def __init__(self, *layers: nn.Module, route=None):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.layers = nn.ModuleList(layers)
        self.route = route

    def forward(self, x):
        x = self.quant(x)
        if self.route is not None:
            return self.route(self, x)
        for layer in self.layers:
            x = layer(x)
        return self.dequant(x)


def _report(model, shape, qconfig_dict=None, example=None):
    torch.manual_seed(0)
    qmodel = calibrate_and_convert(model, [torch.randn(2, *shape)], qconfig_dict)
    return backend.check_model(qmodel, example_inputs=(example if example is not None else torch.randn(1, *shape),))


def _only(report, rule) -> Finding:
    assert not report.deployable and [f.rule for f in report.findings] == [rule], str(report)
    return report.findings[0]


def test_a_deployable_model_passes_with_its_program():
    report = _report(Net(nn.Conv2d(3, 8, 3), nn.ReLU()), (3, 8, 8))
    assert report.deployable and report.program is not None and "deployable on bayes" in str(report)


def test_a_qat_model_and_a_float_model_are_told_to_convert():
    model = Net(nn.Conv2d(3, 8, 3))
    qat = quant.prepare_qat(model)
    assert "convert it first" in str(_only(backend.check_model(qat, (torch.randn(1, 3, 8, 8),)), "convert"))
    assert "float model" in str(_only(backend.check_model(model, (torch.randn(1, 3, 8, 8),)), "convert"))


# --- FAQ 2.4 Q7-Q11 ---------------------------------------------------------------------------------------------
def test_a_loss_in_the_deploy_model_is_named():
    def route(net, x):
        logits = net.dequant(net.layers[0](x).flatten(1))
        return net.layers[1](logits, torch.zeros(len(logits), dtype=torch.long))
    finding = _only(_report(Net(nn.Conv2d(3, 4, 8), nn.CrossEntropyLoss(), route=route), (3, 8, 8)), "trace")
    assert finding.module == "layers.1" and "loss (CrossEntropyLoss)" in finding.message
    assert "deploy_model" in finding.message


def test_a_layer_without_qconfig_is_named_with_the_fix():
    model = Net(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1))
    qconfig_dict = {"": quant.get_default_qat_qconfig(), "module_name": [("layers.1", None)]}
    finding = _only(_report(model, (3, 8, 8), qconfig_dict), "float_module")  # QAT ran it in float
    assert finding.module == "layers.1" and "quant.float_modules" in finding.message
    qmodel = calibrate_and_convert(Net(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1)), [torch.randn(2, 3, 8, 8)])
    qmodel.layers.append(nn.Conv2d(8, 8, 1))
    finding = _only(backend.check_model(qmodel, (torch.randn(1, 3, 8, 8),)), "trace")
    assert finding.module == "layers.2" and "no qconfig" in finding.message and "quant.float_modules" in finding.message


def test_float_post_processing_after_the_dequant_stub_is_refused():
    route = lambda net, x: net.dequant(net.layers[0](x)).softmax(1)  # noqa: E731
    finding = _only(_report(Net(nn.Conv2d(3, 4, 3), route=route), (3, 8, 8)), "trace")
    assert "float op 'softmax'" in finding.message and "DeQuantStub 'dequant'" in finding.message


def test_data_dependent_control_flow_is_refused():
    def on_qtensor(net, x):
        y = net.layers[0](x)
        return net.dequant(y if y else -y)
    with pytest.raises(quant.QuantizationError, match="control flow.*Q10"):  # already in QAT
        _report(Net(nn.Conv2d(3, 1, 8), route=on_qtensor), (3, 8, 8))

    def on_float(net, x):
        y = net.dequant(net.layers[0](x))
        return y if y else -y
    torch.manual_seed(0)
    qmodel = calibrate_and_convert(Net(nn.Conv2d(3, 1, 8), route=on_float), [torch.randn(1, 3, 8, 8)])
    finding = _only(backend.check_model(qmodel, (torch.randn(1, 3, 8, 8),)), "trace")
    assert "control flow" in finding.message and "DeQuantStub 'dequant'" in finding.message


def test_an_empty_model_with_no_output_is_refused():
    def route(net, x):
        net.dequant(net.layers[0](x))  # a forgotten return
    finding = _only(_report(Net(nn.Conv2d(3, 4, 3), route=route), (3, 8, 8)), "trace")
    assert "empty model" in finding.message and "return" in finding.message


def test_an_output_without_dequant_stub_is_refused():
    route = lambda net, x: net.layers[0](x)  # noqa: E731
    finding = _only(_report(Net(nn.Conv2d(3, 4, 3), route=route), (3, 8, 8)), "trace")
    assert "end the model with a DeQuantStub" in finding.message


def test_an_op_on_a_high_precision_output_names_both_modules():
    model = Net(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1))
    qconfig_dict = {"": quant.get_default_qat_qconfig(),
                    "module_name": [("layers.0", quant.get_default_qat_out_qconfig())]}
    with pytest.raises(quant.QuantizationError, match="'layers.0'.*module 'layers.1' uses it.*Q9"):
        _report(model, (3, 8, 8), qconfig_dict)  # QAT already refuses it, with both names


def test_conv_dequant_conv_names_the_stub():
    route = lambda net, x: net.layers[1](net.dequant(net.layers[0](x)))  # noqa: E731
    with pytest.raises(quant.QuantizationError, match="'layers.1' receives the float output of DeQuantStub 'dequant'"):
        calibrate_and_convert(Net(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1), route=route), [torch.randn(2, 3, 8, 8)])


def test_an_unsupported_op_is_named_with_the_alternatives():
    route = lambda net, x: net.dequant(torch.sin(net.layers[0](x)))  # noqa: E731
    with pytest.raises(quant.QuantizationError, match=r"sin is not supported on a QTensor \(it gets the output of "
                                                      r"module 'layers.0'\)\. Supported:"):
        _report(Net(nn.Conv2d(3, 4, 3), route=route), (3, 8, 8))


def test_an_exception_while_tracing_is_reported_with_its_module():
    qmodel = calibrate_and_convert(Net(nn.Conv2d(3, 4, 3)), [torch.randn(2, 3, 8, 8)])
    finding = _only(backend.check_model(qmodel, (torch.randn(1, 5, 8, 8),)), "trace")  # wrong channel count
    assert finding.module == "layers.0" and "raised RuntimeError while tracing" in finding.message


def test_example_inputs_must_be_float_tensors():
    qmodel = calibrate_and_convert(Net(nn.Conv2d(3, 4, 3)), [torch.randn(2, 3, 8, 8)])
    finding = _only(backend.check_model(qmodel, (torch.zeros(1, 3, 8, 8, dtype=torch.long),)), "trace")
    assert "example_inputs[0]" in finding.message


# --- limits of the profile ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer, shape, rule, words", [
    # grouped, or a stride the kernel does not divide: beyond what the compiler tiles (tests/backend/test_legalize.py)
    (nn.Conv2d(8194, 2, 1, groups=2), (8194, 1, 1), "conv.in_channels", "8194 input channels, limit 8192"),
    (nn.Conv2d(1, 2, 32), (1, 32, 32), "conv.kernel", "kernel [32, 32], each side must be in [1, 31]"),
    (nn.Conv2d(5244, 2, 5, groups=2), (5244, 5, 5), "conv.weight_size", "C*kH*kW = 65550 per filter"),
    (nn.Conv2d(1, 1, 1, padding=257), (1, 1, 1), "conv.padding", "padding [257, 257], limit 256"),
    (nn.Conv2d(1, 1, 2, dilation=17), (1, 18, 18), "conv.dilation", "dilation [17, 17], limit 16"),
    (nn.Conv2d(1, 1, 2, dilation=2, stride=2), (1, 8, 8), "conv.stride", "a dilated conv needs stride 1"),
    (nn.Conv2d(1, 1, 1, stride=257), (1, 258, 1), "conv.stride", "stride [257, 257], limit 256"),
])
def test_conv_and_linear_limits(layer, shape, rule, words):
    finding = _only(_report(Net(layer, nn.ReLU()), shape), rule)  # the ReLU: not a model-output conv
    assert words in finding.message and finding.module == "layers.0" and "bayes" in finding.message


def test_out_channels_limit_is_higher_for_a_model_output_conv():
    assert _report(Net(nn.Conv2d(1, 8193, 1)), (1, 1, 1)).deployable  # feeds the DeQuantStub: up to 16384
    finding = _only(_report(Net(nn.Conv2d(1, 8193, 1), nn.ReLU()), (1, 1, 1)), "conv.out_channels")
    assert "8193 output channels, limit 8192" in finding.message


def test_stride_of_a_conv_feeding_a_shortcut_add():
    def route(net, x):
        return net.dequant(net.layers[2].add(net.layers[0](x), net.layers[1](x)))
    model = Net(nn.Conv2d(1, 2, 1, stride=3), nn.Conv2d(1, 2, 1, stride=3), FloatFunctional(), route=route)
    report = _report(model, (1, 9, 9))
    assert [f.rule for f in report.findings] == ["conv.stride", "conv.stride"]
    assert "feeds an add" in report.findings[0].message and "1 or 2" in report.findings[0].message


def test_int16_input_that_can_overflow_the_accumulator():
    model = Net(nn.Conv2d(1, 256, 1), nn.Conv2d(256, 4, 3), nn.ReLU())
    qconfig_dict = {"": quant.get_default_qat_qconfig(),
                    "module_name": [("layers.0", quant.get_default_qat_qconfig(activation_dtype="qint16"))]}
    finding = _only(_report(model, (1, 3, 3), qconfig_dict), "accumulator")
    assert finding.module == "layers.1" and "qint16 input" in finding.message and "> 2147483647" in finding.message
    assert _report(model, (1, 3, 3)).deployable  # the same layers with int8 input cannot overflow


def test_tensor_batch_and_size_limits():
    report = _report(Net(nn.ReLU()), (1, 1, 1), example=torch.randn(4097, 1, 1, 1))
    assert "batch 4097; it exceeds 4096" in str(_only(report, "tensor.batch"))
    report = _report(Net(nn.ReLU()), (1, 1, 65537))
    assert {f.rule for f in report.findings} == {"tensor.dims"} and "<= 65536" in str(report)
    huge = Value("qint16", [4, 256, 1024, 1024])
    (finding,) = tensor_findings("v1", huge, "conv", J5)
    assert finding.rule == "tensor.bytes" and "2147483648 bytes" in finding.message


def test_grid_sample_limits():
    class Warp(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.quant_grid, self.dequant = QuantStub(), QuantStub(), DeQuantStub()

        def forward(self, x, grid):
            return self.dequant(grid_sample(self.quant(x), self.quant_grid(grid)))

    qat = quant.prepare_qat(Warp())
    quant.set_fake_quant_state(qat, "calibration")
    x, grid = torch.randn(1, 1, 2, 1100), torch.randn(1, 2, 2, 2)
    qat(x, grid)
    quant.set_fake_quant_state(qat, "validation")
    finding = _only(backend.check_model(quant.convert(qat), (x, grid)), "grid_sample.size")
    assert "input 2x1100" in finding.message and "1024" in finding.message
    program = Program("bayes", [], [], {"a": Value("qint16", [1, 1, 4, 4]), "g": Value("float32", [1, 2, 2, 2])},
                      [], {})
    node = Node("grid_sample", ["a", "g"], "o", {"mode": "bicubic", "padding_mode": "zeros"}, "warp")
    rules = [f.rule for f in _grid_sample_findings(node, program, J5, [])]
    assert rules == ["grid_sample.dtype", "grid_sample.dtype", "grid_sample.mode"]


# --- compile and HNN_MODEL_EXPORT (FAQ 2.4 Q6) -------------------------------------------------------------------
def test_compile_refuses_with_the_report_and_exports_on_request(tmp_path, monkeypatch):
    qmodel = calibrate_and_convert(Net(nn.Conv2d(1, 2, 32), nn.ReLU()), [torch.randn(2, 1, 32, 32)])
    x = torch.randn(1, 1, 32, 32)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelCheckError, match=r"conv.kernel.*layers.0") as info:
        backend.compile(qmodel, (x,))
    assert info.value.report.findings[0].rule == "conv.kernel" and not list(tmp_path.iterdir())
    monkeypatch.setenv("HNN_MODEL_EXPORT", "1")
    with pytest.raises(ModelCheckError, match="written to .*hnn_model_export.hir"):
        backend.compile(qmodel, (x,))
    assert torch.equal(backend.load(tmp_path / "hnn_model_export.hir").run(x), qmodel(x))


def test_checking_leaves_the_model_in_its_mode():
    qmodel = calibrate_and_convert(Net(nn.Conv2d(3, 4, 3)), [torch.randn(2, 3, 8, 8)]).train()
    assert backend.check_model(qmodel, (torch.randn(1, 3, 8, 8),)).deployable and qmodel.training
