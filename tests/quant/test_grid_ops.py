"""The grid ops torchvision/timm families need, on QTensors (issue 16): adaptive_avg_pool2d of any output size and
avg_pool2d with ceil_mode / count_include_pad=False (window_mean: a divisor per output position), chunk / split /
unbind (index), channel shuffle, flatten / swapaxes / reshape_as / view_as / roll (layout), constant F.pad (pad),
bilinear interpolate (resize_bilinear), F.linear in graph mode. Each: QAT and quantized modes give the same grid, QAT
tracks the quantized model, the program is bit-exact (batch 1 and after a .hir round trip too), the checker passes,
and the ONNX QDQ form runs in onnxruntime within a step of the program."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hat import backend, quant
from hat.integer.profile import J5
from hat.quant.onnx_helper import export_quantized_onnx
from hat.quant.qtensor import QTensor, QuantizationError, quantize

DTYPES = ("qint8", "qint16")


def _shuffle(t, groups=2):
    b, c, h, w = t.size()
    return t.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


# name -> (op on the conv's [N, 6, 7, 7] output, the kernel it must compile to)
OPS = {
    "adaptive_3x3_overlapping": (lambda t: F.adaptive_avg_pool2d(t, 3), "window_mean"),
    "adaptive_10x4_repeating": (lambda t: F.adaptive_avg_pool2d(t, (10, 4)), "window_mean"),
    "adaptive_none_2": (lambda t: F.adaptive_avg_pool2d(t, (None, 2)), "window_mean"),
    "adaptive_module_7_on_7": (nn.AdaptiveAvgPool2d((7, 7)), "avg_pool2d"),
    "adaptive_1_global": (lambda t: F.adaptive_avg_pool2d(t, 1), "global_avg_pool"),
    "avg_ceil_exclude_pad": (nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), "window_mean"),
    "avg_padding_exclude_pad": (lambda t: F.avg_pool2d(t, 3, 2, 1, count_include_pad=False), "window_mean"),
    "avg_ceil_include_pad": (lambda t: F.avg_pool2d(t, 4, 2, 1, ceil_mode=True), "window_mean"),
    "avg_ceil_divisor_override": (lambda t: F.avg_pool2d(t, 2, ceil_mode=True, divisor_override=3), "window_mean"),
    "chunk": (lambda t: torch.cat(t.chunk(4, dim=1)[::-1], 1), "index"),
    "torch_chunk": (lambda t: torch.cat(torch.chunk(t, 2, 2)[::-1], 2), "index"),
    "split_sizes": (lambda t: torch.cat(torch.split(t, [1, 3, 2], dim=1)[::-1], 1), "index"),
    "split_size": (lambda t: torch.cat(t.split(3, dim=3)[::-1], 3), "index"),
    "unbind": (lambda t: torch.cat([p.unsqueeze(1) for p in t.unbind(1)[::-1]], 1), "index"),
    "torch_unbind": (lambda t: torch.cat([p.unsqueeze(2) for p in torch.unbind(t, 2)[::-1]], 2), "index"),
    "channel_shuffle": (_shuffle, "layout"),
    "flatten_1_2_reshape_as": (lambda t: torch.flatten(t, 1, 2).reshape_as(t), "layout"),
    "flatten_2_view_as": (lambda t: t.flatten(2).view_as(t), "layout"),
    "swapaxes": (lambda t: t.swapaxes(2, 3), "layout"),
    "swapdims": (lambda t: torch.swapdims(t, 1, 3), "layout"),
    "transpose": (lambda t: t.transpose(-1, -2), "layout"),
    "roll": (lambda t: torch.roll(t, shifts=(2, -3), dims=(2, 3)), "layout"),
    "roll_method": (lambda t: t.roll(1, 1), "layout"),
    "pad": (lambda t: F.pad(t, (1, 2, 0, 1)), "pad"),
    "pad_value": (lambda t: F.pad(t, (1, 1, 2, 0), mode="constant", value=0.3), "pad"),
    "pad_crop": (lambda t: F.pad(t, (-1, 0, 0, -2)), "pad"),
    "pad_saturating_value": (lambda t: F.pad(t, (1, 1), value=1e3), "pad"),
    "bilinear_x2": (lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False),
                    "resize_bilinear"),
    "bilinear_align_corners": (lambda t: F.interpolate(t, size=(5, 9), mode="bilinear", align_corners=True),
                               "resize_bilinear"),
    "bilinear_size": (lambda t: F.interpolate(t, size=(10, 4), mode="bilinear"), "resize_bilinear"),
    "bilinear_module_x1_5": (nn.Upsample(scale_factor=1.5, mode="bilinear"), "resize_bilinear"),
}


class Op(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


class ConvOp(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.quant, self.conv, self.op, self.dequant = quant.QuantStub(), nn.Conv2d(3, 6, 3, padding=1), Op(f), \
            quant.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.op(self.conv(self.quant(x))))


def _inputs(seed=0, batch=4):
    return torch.randn(batch, 3, 7, 7, generator=torch.Generator().manual_seed(seed))


def _converted(f, dtype):
    torch.manual_seed(0)
    qat = quant.prepare_qat(ConvOp(f), {"": quant.get_default_qat_qconfig(activation_dtype=dtype)})
    quant.set_fake_quant_state(qat, "calibration")
    with torch.no_grad():
        for seed in range(3):
            qat(_inputs(seed))
    quant.set_fake_quant_state(qat, "validation")
    return qat.eval(), quant.convert(qat)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OPS)
def test_grid_op_through_every_stage(name, dtype, tmp_path):
    f, kernel = OPS[name]
    qat, qmodel = _converted(f, dtype)
    x = _inputs(7)
    step = float(qmodel.conv.out_scale)
    with torch.no_grad():
        expected = qmodel(x)
        assert ((qat(x) - expected).abs() / step).max() <= 2.0001  # QAT tracks the quantized model
    report = backend.check_model(qmodel, (x,))
    assert report.deployable, str(report)
    program = report.program
    assert kernel in [n.op for n in program.nodes]
    loaded = backend.load(program.save(tmp_path / "m.hir"))
    for batch in (x, x[:1]):
        with torch.no_grad():
            want = qmodel(batch)
        assert torch.equal(program.run(batch, reference=True), want)  # the fast executor is the reference
        assert torch.equal(program.run(batch), want) and torch.equal(loaded.run(batch), want)
    assert torch.equal(backend.compile(qmodel, (x,), march="bayes").run(x), expected)
    ort = pytest.importorskip("onnxruntime")
    path = export_quantized_onnx(qmodel, (x,), tmp_path / "m.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options)
    for batch in (x, x[:1]):
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0])
        # float requantization of the conv (int16: 1 step), ONNX's half-even rounding of ties (an average, a
        # bilinear sum with dyadic weights); float32 outputs near 2^15 steps (int16) are off by up to 2^-9 step
        difference = (got - program.run(batch)).abs() / step
        assert difference.max() <= 2 + 2 ** -8 and difference.mean() < 0.3


def _pair(dtype):
    x = torch.randn(2, 6, 7, 7, generator=torch.Generator().manual_seed(1)) * 2
    scale = torch.tensor([0.05 if dtype == "qint8" else 0.0005])
    quantized = quantize(x, scale, dtype, profile=J5)
    return QTensor(quantized.data.float() * scale, scale, dtype, profile=J5), quantized


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OPS)
def test_qat_and_quantized_modes_give_the_same_grid_and_follow_torch(name, dtype):
    """The same integers in: the same integers out in both modes (pools: the same ratio m / 2^n, applied exactly);
    close to torch's float op on the dequantized input."""
    f = OPS[name][0]
    qat, quantized = _pair(dtype)
    a, b = f(qat), f(quantized)
    assert isinstance(a, QTensor) and isinstance(b, QTensor) and torch.equal(a.scale, b.scale)
    assert torch.equal(a.int_repr(), b.data.long())
    reference = f(quantized.dequantize())
    error = (b.dequantize() - reference).abs() / float(quantized.scale)
    if "bilinear" in name:  # source coordinates rounded to 2^-8 of a pixel: an error of the neighbours' step / 256
        q = quantized.data.double()
        jump = max(float(q.diff(dim=-1).abs().max()), float(q.diff(dim=-2).abs().max()))
        assert float(error.max()) <= 0.5001 + jump / 2 ** 9
    elif name.startswith(("adaptive", "avg")):
        assert float(error.max()) <= 0.5001 + (0.02 if dtype == "qint16" else 0)  # rounding; 15-bit 1/area
    else:
        assert float(error.max()) <= 1e-4 or name == "pad_saturating_value"


def test_gradients_flow_through_the_new_qat_ops():
    data = torch.randn(1, 2, 5, 5, requires_grad=True)
    x = QTensor(data, torch.tensor([0.05]), "qint8", profile=J5)
    y = [F.adaptive_avg_pool2d(x, 3), F.interpolate(x, scale_factor=2, mode="bilinear"), F.pad(x, (1, 1)),
         torch.roll(x, 1, 2), *x.chunk(2, 1)]
    sum(t.dequantize().sum() for t in y).backward()
    assert data.grad is not None and float(data.grad.abs().sum()) > 0


def test_window_mean_divisors_follow_torch():
    """Per-position divisors equal torch's: a constant in, torch's mean of it (rounded half up) out."""
    x = QTensor(torch.full((1, 1, 5, 5), 90, dtype=torch.int8), torch.tensor([0.125]), "qint8", profile=J5)
    for f in (lambda t: F.avg_pool2d(t, 2, 2, ceil_mode=True, count_include_pad=False),
              lambda t: F.avg_pool2d(t, 4, 2, 1, ceil_mode=True), lambda t: F.avg_pool2d(t, 3, 2, 1, ceil_mode=True),
              lambda t: F.avg_pool2d(t, 3, 2, 1, count_include_pad=False), lambda t: F.adaptive_avg_pool2d(t, (3, 7)),
              lambda t: F.avg_pool2d(t, 2, ceil_mode=True, divisor_override=1)):
        want = torch.floor(f(x.data.double()) + 0.5).clamp(-128, 127)
        assert torch.equal(f(x).data.double(), want)


def test_refused_forms_say_what_to_do():
    x = QTensor(torch.zeros(1, 2, 4, 4), torch.tensor([0.1]), "qint8", profile=J5)
    with pytest.raises(QuantizationError, match=r"F\.pad\(mode='reflect'\).*only mode='constant'"):
        F.pad(x, (1, 1), mode="reflect")
    with pytest.raises(QuantizationError, match="without dims"):
        torch.roll(x, 1)
    with pytest.raises(QuantizationError, match=r"mode='bicubic'.*mode='bilinear'"):
        F.interpolate(x, scale_factor=2, mode="bicubic")
    with pytest.raises(QuantizationError, match="add up to 3"):
        torch.split(x, [1, 2], 1)


def test_functional_linear_is_rewritten_into_a_linear_sharing_the_parameter(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2)
            self.head_weight = nn.Parameter(torch.randn(5, 36) * 0.1)
            self.head_bias = nn.Parameter(torch.randn(5) * 0.1)

        def forward(self, x):
            return F.linear(torch.flatten(F.relu(self.conv(x)), 1), self.head_weight, self.head_bias)

    torch.manual_seed(0)
    model, x = Net().eval(), _inputs(3)
    qat = quant.prepare_qat_fx(model, None, example_inputs=(x,))
    linears = [m for m in qat.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].weight is qat.head_weight and linears[0].bias is qat.head_bias
    quant.set_fake_quant_state(qat, "calibration")
    with torch.no_grad():
        qat(x)
    quant.set_fake_quant_state(qat, "validation")
    qmodel = quant.convert_fx(qat.eval())
    assert "linear" in [n.op for n in backend.compile(qmodel, (x,)).nodes]
    with torch.no_grad():
        assert float(F.cosine_similarity(qmodel(x).flatten(), model(x).flatten(), dim=0)) > 0.99
    assert torch.equal(backend.compile(qmodel, (x,), march="bayes").run(x), qmodel(x))


def test_functional_linear_with_a_computed_weight_is_refused():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 3))

        def forward(self, x):
            return F.linear(x.mean((2, 3)), self.weight * 2)

    with pytest.raises(QuantizationError, match=r"F\.linear in test_grid_ops\.py:\d+.*computed in forward"):
        quant.prepare_qat_fx(Net().eval(), example_inputs=(_inputs(0),))


def _torchvision_program(name, size=64):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    qat = quant.prepare_qat_fx(model, None, example_inputs=(x,))
    quant.set_fake_quant_state(qat, "calibration")
    qat.eval()
    with torch.no_grad():
        for seed in range(2):
            qat(torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed + 1)))
    quant.set_fake_quant_state(qat, "validation")
    qmodel = quant.convert_fx(qat)
    report = backend.check_model(qmodel, (x,), march="bayes")
    # alexnet's and vgg's first classifier Linear takes 9216 / 25088 inputs, over the J5 limit of 8192 input
    # channels (the checker's linear.in_channels): compile refuses them, the traced program is still bit-exact
    assert all(f.rule == "linear.in_channels" for f in report.findings), str(report)
    program = report.program
    with torch.no_grad():
        for batch in (x, x[:1]):
            assert torch.equal(program.run(batch), qmodel(batch))
        assert float(F.cosine_similarity(qat(x).flatten(), qmodel(x).flatten(), dim=0)) > 0.95
    return {n.op for n in program.nodes}, report


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alexnet", "vgg11_bn"])
def test_torchvision_adaptive_pool_models_compile_bit_exact(name):
    ops, report = _torchvision_program(name)
    assert "window_mean" in ops  # (6, 6) / (7, 7) from a 1x1 / 2x2 map: windows repeat / overlap
    assert [f.rule for f in report.findings] == ["linear.in_channels"]


def test_torchvision_shufflenet_compiles_bit_exact():
    ops, report = _torchvision_program("shufflenet_v2_x0_5", size=32)
    assert report.deployable, str(report)
    assert {"index", "layout", "cat"} <= ops  # chunk, channel shuffle, cat of the branches
