"""LayerNorm and GroupNorm (issue 16), int8 and int16 activations: eager (nn.LayerNorm / nn.GroupNorm) and graph mode
(F.layer_norm / F.group_norm on the model's parameters): QAT tracks the quantized model, the program is bit-exact with
it (batch 1 and after a .hir round trip too), the checker passes, the ONNX QDQ form runs in onnxruntime within a few
output steps; the kernel stays within ~2 output steps of float64 layer norm of the same integers; torchvision's
convnext_tiny, VisionTransformer and swin_t go through prepare_qat_fx -> calibrate -> convert -> bit-exact program."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hat import backend, quant
from hat.integer import kernels
from hat.integer.norm_tables import layer_norm_params
from hat.integer.profile import J5
from tests.backend.conftest import calibrate, run_quantized_onnx

DTYPES = ("qint8", "qint16")
MODELS = ("sequence", "convnext_block", "group_norm")
C = 16


class Sequence(nn.Module):
    """Linear -> LayerNorm over the last dim, on (N, L, 8)."""

    def __init__(self, eager, functional):
        super().__init__()
        self.eager, self.functional = eager, functional
        self.fc, self.norm = nn.Linear(8, C), nn.LayerNorm(C)
        self.quant, self.dequant = quant.QuantStub(), quant.DeQuantStub()

    def forward(self, x):
        x = self.fc(self.quant(x) if self.eager else x)
        x = F.layer_norm(x, (C,), self.norm.weight, self.norm.bias, 1e-5) if self.functional else self.norm(x)
        return self.dequant(x) if self.eager else x


class ConvNeXtBlock(nn.Module):
    """dwconv -> permute(0, 2, 3, 1) -> LayerNorm -> Linear -> GELU -> Linear -> permute back -> + residual, on
    (N, C, 6, 6)."""

    def __init__(self, eager, functional):
        super().__init__()
        self.eager, self.functional = eager, functional
        self.dwconv = nn.Conv2d(C, C, 7, padding=3, groups=C)
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(C, eps=1e-6), nn.Linear(C, 4 * C), nn.GELU(), \
            nn.Linear(4 * C, C)
        self.quant, self.dequant, self.add = quant.QuantStub(), quant.DeQuantStub(), quant.FloatFunctional()

    def forward(self, x):
        x = self.quant(x) if self.eager else x
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = F.layer_norm(y, (C,), self.norm.weight, self.norm.bias, 1e-6) if self.functional else self.norm(y)
        y = self.fc2(self.act(self.fc1(y))).permute(0, 3, 1, 2)
        return self.dequant(self.add.add(x, y)) if self.eager else x + y


class GroupNormNet(nn.Module):
    """Conv -> GroupNorm(4, C) on (N, C, H, W)."""

    def __init__(self, eager, functional):
        super().__init__()
        self.eager, self.functional = eager, functional
        self.conv, self.norm = nn.Conv2d(3, C, 3, padding=1), nn.GroupNorm(4, C)
        self.quant, self.dequant = quant.QuantStub(), quant.DeQuantStub()

    def forward(self, x):
        x = self.conv(self.quant(x) if self.eager else x)
        x = F.group_norm(x, 4, self.norm.weight, self.norm.bias, 1e-5) if self.functional else self.norm(x)
        return self.dequant(x) if self.eager else x


_CLASSES = {"sequence": Sequence, "convnext_block": ConvNeXtBlock, "group_norm": GroupNormNet}
_SHAPES = {"sequence": (4, 5, 8), "convnext_block": (4, C, 6, 6), "group_norm": (4, 3, 6, 6)}


def _inputs(kind, seed=0):
    return torch.randn(*_SHAPES[kind], generator=torch.Generator().manual_seed(seed))


def _model(kind, build):
    torch.manual_seed(0)
    model = _CLASSES[kind](eager=build == "eager", functional=build == "fx").eval()
    with torch.no_grad():  # an affine far from the identity
        model.norm.weight.copy_(1 + 0.5 * torch.randn(C))
        model.norm.bias.copy_(0.3 * torch.randn(C))
    return model


def _converted(kind, build, dtype):
    model, qconfig_dict = _model(kind, build), {"": quant.get_default_qat_qconfig(activation_dtype=dtype)}
    x = _inputs(kind)
    qat = (quant.prepare_qat(model, qconfig_dict) if build == "eager"
           else quant.prepare_qat_fx(model, qconfig_dict, example_inputs=(x,)))
    qat = calibrate(qat, [_inputs(kind, seed) for seed in range(3)])
    return model, qat, quant.convert(qat)


def _cosine(a, b):
    return float(F.cosine_similarity(a.detach().flatten().double(), b.detach().flatten().double(), dim=0))


def _program_checks(qmodel, x, tmp_path):
    report = backend.check_model(qmodel, (x,))
    assert report.deployable, str(report)
    program = report.program
    assert backend.compile(qmodel, (x,), march="bayes").run(x).equal(qmodel(x))
    loaded = backend.load(program.save(tmp_path / "m.hir"))
    for batch in (x, x[:1]):
        with torch.no_grad():
            reference = qmodel(batch)
        assert torch.equal(program.run(batch), reference) and torch.equal(loaded.run(batch), reference)
        assert torch.equal(loaded.run(batch, reference=True), reference)  # fast executor == reference kernels
    return program


def _onnx(qmodel, x, tmp_path):
    pytest.importorskip("onnxruntime")
    return run_quantized_onnx(qmodel, x, tmp_path)


@pytest.mark.parametrize("build", ("eager", "fx"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MODELS)
def test_norm_through_every_stage(kind, dtype, build, tmp_path):
    model, qat, qmodel = _converted(kind, build, dtype)
    x = _inputs(kind, seed=7)
    with torch.no_grad():
        expected, fake, out = model(x), qat(x), qmodel(x)
    assert _cosine(fake, out) > 0.99 and _cosine(out, expected) > 0.99
    assert sum(type(m).__name__ == "QuantizedLayerNorm" for m in qmodel.modules()) == 1
    program = _program_checks(qmodel, x, tmp_path)
    node = next(n for n in program.nodes if n.op == "layer_norm")
    assert (node.params["groups"], node.params["start_dim"]) == ((4, 1) if kind == "group_norm" else (1, x.ndim - 1))
    got = _onnx(qmodel, x, tmp_path)
    step = program.values[program.nodes[-2].output].scale[0]  # the last layer's output scale
    steps = (got - program.run(x)).abs() / float(step)
    assert steps.max() <= 3 and steps.mean() < 0.5, (float(steps.max()), float(steps.mean()))


@pytest.mark.parametrize("channels", (16, 96, 768))
@pytest.mark.parametrize("in_dtype, out_dtype", [("qint8", "qint8"), ("qint16", "qint16"), ("qint16", "qint8"),
                                                 ("qint8", "qint16")])
def test_kernel_stays_within_a_few_steps_of_float64(in_dtype, out_dtype, channels):
    """The kernel against float64 layer norm of the same integers: an int8 output within 0.51 of a step of the
    rounded value, int16 within 2 steps (the 15-bit rsqrt table and the int16 multiplier)."""
    generator = torch.Generator().manual_seed(0)
    qmax = 127 if in_dtype == "qint8" else 32767
    x = torch.randn(64, 7, channels, generator=generator) * 2 + torch.randn(64, 7, 1, generator=generator)
    s_in = float(x.abs().max()) / (qmax + 0.5)
    xq = torch.floor(x / s_in + 0.5).clamp(-qmax - 1, qmax)
    weight = 1 + 0.5 * torch.randn(channels, generator=generator)
    bias = 0.3 * torch.randn(channels, generator=generator)
    reference = F.layer_norm(xq.double() * s_in, (channels,), weight.double(), bias.double(), 1e-5)
    s_out = float(reference.abs().max()) / (127.5 if out_dtype == "qint8" else 32767.5)
    params = layer_norm_params(s_in, in_dtype, s_out, out_dtype, count=channels, start_dim=2, groups=1, eps=1e-5,
                               weight=weight, bias=bias, affine_shape=[channels], profile=J5)
    got = kernels.KERNELS["layer_norm"](xq.to(torch.int8 if in_dtype == "qint8" else torch.int16), **params)
    steps = (got.double() - reference / s_out).abs()
    assert steps.max() <= (0.51 if out_dtype == "qint8" else 2.0), float(steps.max())
    assert steps.mean() < 0.3


def test_constant_input_gives_the_bias_and_large_groups_stay_exact():
    """Variance 0: y = 0, the output is beta on the grid; a GroupNorm group of 2^20 int16 elements still sums
    exactly (fewer mean bits)."""
    params = layer_norm_params(0.01, "qint16", 0.01, "qint16", count=8, start_dim=1, groups=1, eps=1e-5,
                               weight=torch.ones(8), bias=torch.full((8,), 0.5), affine_shape=[8], profile=J5)
    out = kernels.KERNELS["layer_norm"](torch.full((2, 8), 1234, dtype=torch.int16), **params)
    assert (out == 50).all()
    big = layer_norm_params(0.01, "qint16", 0.001, "qint16", count=2 ** 20, start_dim=1, groups=1, eps=1e-5,
                            weight=None, bias=None, affine_shape=[1], profile=J5)
    assert big["mean_bits"] == 5
    x = torch.randint(-32768, 32767, (1, 2 ** 20), generator=torch.Generator().manual_seed(0)).to(torch.int16)
    got = kernels.KERNELS["layer_norm"](x, **big)
    reference = F.layer_norm(x.double() * 0.01, (2 ** 20,), eps=1e-5) / 0.001
    assert float((got.double() - reference.clamp(-32768, 32767)).abs().max()) <= 2


def _torchvision_program(model, x, batches, tmp_path, min_cosine):
    qat = quant.prepare_qat_fx(model, {"": quant.get_default_qat_qconfig()}, example_inputs=(x,))
    qmodel = quant.convert(calibrate(qat, batches))
    with torch.no_grad():
        assert _cosine(qmodel(x), qat(x)) > min_cosine
    return _program_checks(qmodel, x, tmp_path)


def test_torchvision_vision_transformer(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight, std=0.3)  # torchvision starts the head at zero
    batches = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    program = _torchvision_program(model, batches[0], batches, tmp_path, 0.97)
    assert [n.op for n in program.nodes].count("layer_norm") == 3


def test_torchvision_convnext_tiny(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(weights=None, num_classes=10).eval()
    batches = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    program = _torchvision_program(model, batches[0], batches, tmp_path, 0.9)
    assert [n.op for n in program.nodes].count("layer_norm") == 23  # 18 blocks, 3 downsamples, stem, head


@pytest.mark.parametrize("version", [1, 2])
def test_torchvision_swin(version, tmp_path):
    """Swin in small: torchvision's fx.wrap'd shifted_window_attention traced through, its attention mask built by
    item assignment on x.new_zeros(...) kept float and quantized where it meets the scores. Version 2 adds cosine
    attention (F.normalize), a qkv bias computed in forward and a position-bias MLP on a constant table."""
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

    torch.manual_seed(0)
    v2 = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if version == 2 else {}
    model = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                               window_size=[4, 4], num_classes=10, **v2).eval()
    batches = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    program = _torchvision_program(model, batches[0], batches, tmp_path, 0.95)
    ops = [n.op for n in program.nodes]
    assert ops.count("softmax_lut") == 4 and ops.count("layout") > 0
    assert sum(n.op == "layout" and n.params["method"] == "roll" for n in program.nodes) == 2  # 1 shifted block: 2
