"""matmul of two activations and attention (hat/quant/attention.py): FloatFunctional.matmul in eager mode and `@`,
torch.matmul/bmm, Tensor.matmul and plain-matmul einsum in graph mode; scaled_dot_product_attention and
nn.MultiheadAttention rewritten by prepare_qat_fx; a ViT's class token and position embedding. Each goes through QAT,
convert, the checker, the integer program (bit-exact, any batch, .hir round trip) and, for matmul, ONNX."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hat import backend, quant
from hat.integer import kernels
from hat.integer.profile import TORCH_DTYPES, qrange
from hat.quant.qat import QATFloatFunctional, QATQuantStub

from tests.backend.conftest import calibrate, run_quantized_onnx

INT8, INT16 = quant.get_default_qat_qconfig(), quant.get_default_qat_qconfig(activation_dtype="qint16")


def _cosine(a, b):
    return float(F.cosine_similarity(a.detach().flatten().double(), b.detach().flatten().double(), dim=0))


def _prepared(model, build, qconfig_dict, x):
    return (quant.prepare_qat(model, qconfig_dict) if build == "eager"
            else quant.prepare_qat_fx(model, qconfig_dict, example_inputs=(x,)))


def _batches(shape, count=4, scale=1.0):
    generator = torch.Generator().manual_seed(1)
    return [scale * torch.randn(*shape, generator=generator) for _ in range(count)]


def _program_checks(qmodel, x, tmp_path):
    """Deployable, and the program (and its .hir round trip) bit-exact with the model at the example's batch and 1."""
    report = backend.check_model(qmodel, (x,))
    assert report.deployable, str(report)
    loaded = backend.load(report.program.save(tmp_path / "m.hir"))
    for batch in (x, x[:1]):
        with torch.no_grad():
            reference = qmodel(batch)
        assert torch.equal(report.program.run(batch), reference) and torch.equal(loaded.run(batch), reference)
        assert torch.equal(loaded.run(batch, reference=True), reference)  # fast executor == reference kernels
    return report.program


def _onnx(qmodel, x, tmp_path):
    pytest.importorskip("onnxruntime")
    return run_quantized_onnx(qmodel, x, tmp_path)


# --- matmul --------------------------------------------------------------------------------------------------------
class EagerMatmul(nn.Module):
    """QuantStub -> two Linears -> FloatFunctional.matmul(a, b^T) -> DeQuantStub, on [N, 5, 8]."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant, self.f = quant.QuantStub(), quant.DeQuantStub(), quant.FloatFunctional()
        self.a, self.b = nn.Linear(8, 6), nn.Linear(8, 6)

    def forward(self, x):
        x = self.quant(x)
        return self.dequant(self.f.matmul(self.a(x), self.b(x).permute(0, 2, 1)))


class PlainMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 6), nn.Linear(8, 6)

    def forward(self, x):
        return self.a(x) @ self.b(x).transpose(1, 2)


@pytest.mark.parametrize("out_dtype", ("qint8", "qint16"))
@pytest.mark.parametrize("build", ("eager", "fx"))
def test_matmul_through_every_stage(build, out_dtype, tmp_path):
    torch.manual_seed(0)
    model = (EagerMatmul if build == "eager" else PlainMatmul)().eval()
    # int8 operands (the linears); the matmul's own output int8 or int16: qint8 x qint8 fits int32 for any K here
    qconfig_dict = {"": INT8, "module_type": [(quant.FloatFunctional, INT16 if out_dtype == "qint16" else INT8)]}
    x = _batches((4, 5, 8), 1)[0]
    qat = calibrate(_prepared(model, build, qconfig_dict, x), _batches((4, 5, 8)))
    qmodel = quant.convert(qat)
    with torch.no_grad():
        expected, fake, out = model(x), qat(x), qmodel(x)
    assert _cosine(fake, out) > 0.99 and _cosine(out, expected) > 0.99
    program = _program_checks(qmodel, x, tmp_path)
    node = next(n for n in program.nodes if n.op == "matmul")
    assert program.values[node.output].dtype == out_dtype
    assert "accumulate" not in node.params  # how to sum is the executor's choice, not the file's
    steps = (_onnx(qmodel, x, tmp_path) - program.run(x)).abs() / program.values[node.output].scale[0]
    assert float(steps.max()) <= 2.01  # ONNX: half-even rounding and float requantization, a step or two off


def test_int16_times_int16_is_refused_by_the_checker():
    torch.manual_seed(0)
    x = _batches((2, 5, 8), 1)[0]
    qmodel = quant.convert(calibrate(quant.prepare_qat(EagerMatmul().eval(), {"": INT16}), [x]))
    report = backend.check_model(qmodel, (x,))
    finding = next(f for f in report.findings if f.rule == "accumulator")
    assert finding.module == "f" and "qint16 x qint16 over K = 6" in finding.message and "int8" in finding.message


@pytest.mark.parametrize("dtypes,k,plan", [(("qint8", "qint8"), 40, ("float32", 1)),
                                           (("qint8", "qint8"), 3000, ("float32", 3)),
                                           (("qint8", "qint16"), 400, ("float64", 1)),
                                           (("qint16", "qint16"), 2, ("float64", 1))])
def test_matmul_kernel_sums_exactly(dtypes, k, plan):
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.randint(qrange(d)[0], qrange(d)[1] + 1, shape, generator=generator).to(TORCH_DTYPES[d])
            for d, shape in zip(dtypes, ((2, 3, k), (2, k, 4))))
    chosen = kernels.matmul_plan(k, *dtypes)
    assert (chosen["accumulate"], chosen["splits"]) == plan
    acc = kernels.matmul(x, y, multiplier=1, shift=0, out_dtype="qint32")  # the accumulator itself
    exact = (x.double() @ y.double()).clamp(*qrange("qint32"))  # float64: exact for these sizes
    assert torch.equal(acc.double(), exact)
    low_x, low_y = (torch.full(shape, qrange(d)[0]).to(TORCH_DTYPES[d]) for d, shape in zip(dtypes, ((1, k), (k, 1))))
    worst = kernels.matmul(low_x, low_y, multiplier=1, shift=0, out_dtype="qint32")  # saturates to int32
    assert int(worst) == min(k * qrange(dtypes[0])[0] * qrange(dtypes[1])[0], qrange("qint32")[1])


class Forms(nn.Module):
    """One matmul of two activations, written as `form`."""

    def __init__(self, form):
        super().__init__()
        self.form, self.a, self.b = form, nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        f = self.form
        if f == "torch.matmul":
            return torch.matmul(a, b.transpose(-2, -1))
        if f == "torch.bmm":
            return torch.bmm(a, b.transpose(1, 2))
        if f == "Tensor.matmul":
            return a.matmul(b.transpose(1, 2))
        if f == "einsum bij,bkj->bik":
            return torch.einsum("bij,bkj->bik", a, b)
        if f == "einsum bhqd,bhkd->bhqk":
            heads = lambda t: t.reshape(t.shape[0], t.shape[1], 2, 4).permute(0, 2, 1, 3)  # noqa: E731
            return torch.einsum("bhqd,bhkd->bhqk", heads(a), heads(b))
        if f == "einsum ...j,...j->...":  # a dot product per row: no free index on either side
            return torch.einsum("...j,...j->...", a, b)
        return torch.einsum("bij,bj->bi", a, b[:, 0])  # matrix-vector


@pytest.mark.parametrize("form", ("torch.matmul", "torch.bmm", "Tensor.matmul", "einsum bij,bkj->bik",
                                  "einsum bhqd,bhkd->bhqk", "einsum ...j,...j->...", "einsum bij,bj->bi"))
def test_matmul_calls_are_rewritten_by_prepare_qat_fx(form, tmp_path):
    torch.manual_seed(0)
    model, x = Forms(form).eval(), _batches((3, 5, 8), 1)[0]
    qat = quant.prepare_qat_fx(model, {"": INT8}, example_inputs=(x,))
    assert sum(isinstance(m, QATFloatFunctional) for m in qat.modules()) == 1
    qat = calibrate(qat, _batches((3, 5, 8)))
    qmodel = quant.convert(qat)
    with torch.no_grad():
        assert _cosine(qmodel(x), model(x)) > 0.99
    program = _program_checks(qmodel, x, tmp_path)
    assert [n.op for n in program.nodes].count("matmul") == 1


def test_einsum_that_is_no_matmul_is_refused_naming_the_line():
    class Outer(nn.Module):
        def forward(self, x):
            return torch.einsum("bi,bj->bij", x, x * 2)

    with pytest.raises(quant.QuantizationError, match=r"einsum\('bi,bj->bij'.*test_attention\.py:\d+.*one matmul"):
        quant.prepare_qat_fx(Outer(), example_inputs=(torch.randn(2, 4),))


def test_activation_times_a_parameter_quantizes_the_parameter(tmp_path):
    class ByWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 6) / 3)

        def forward(self, x):
            return x @ self.w

    torch.manual_seed(0)
    model, x = ByWeight().eval(), _batches((4, 5, 8), 1)[0]
    qat = quant.prepare_qat_fx(model, {"": INT8}, example_inputs=(x,))
    assert sum(isinstance(m, QATQuantStub) for m in qat.modules()) == 2  # the input's and the weight's
    qmodel = quant.convert(calibrate(qat, _batches((4, 5, 8))))
    with torch.no_grad():
        assert _cosine(qmodel(x), model(x)) > 0.99
    _program_checks(qmodel, x, tmp_path)


# --- scaled_dot_product_attention --------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, dim=16, heads=2, causal=False, bias=False):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.heads, self.causal = heads, causal
        self.bias = nn.Parameter(torch.randn(6, 6) / 2) if bias else None

    def forward(self, x):
        n, length, dim = x.shape
        split = lambda t: t.reshape(n, length, self.heads, dim // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=self.bias,
                                           is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(n, length, dim))


@pytest.mark.parametrize("bias", (False, True), ids=("plain", "additive_mask"))
def test_self_attention_block(bias, tmp_path):
    torch.manual_seed(0)
    model = SelfAttention(bias=bias).eval()
    with torch.no_grad():  # scores of a few units: attention far from uniform
        model.q.weight.mul_(3)
    x = _batches((4, 6, 16), 1)[0]
    qat = quant.prepare_qat_fx(model, {"": INT8}, example_inputs=(x,))
    qmodel = quant.convert(calibrate(qat, _batches((4, 6, 16), 6)))
    with torch.no_grad():
        expected, out = model(x), qmodel(x)
    assert _cosine(out, expected) > 0.98
    program = _program_checks(qmodel, x, tmp_path)
    ops = [n.op for n in program.nodes]
    assert ops.count("matmul") == 2 and ops.count("softmax_lut") == 1 and ops.count("add") == int(bias)
    assert _cosine(_onnx(qmodel, x, tmp_path), out) > 0.99


def test_causal_attention_is_refused_naming_the_line():
    with pytest.raises(quant.QuantizationError, match=r"is_causal=True in test_attention\.py:\d+"):
        quant.prepare_qat_fx(SelfAttention(causal=True), example_inputs=(torch.randn(2, 6, 16),))


# --- ViT: class token, position embedding, nn.MultiheadAttention ---------------------------------------------------
class TinyViT(nn.Module):
    """Patches -> class token + position embedding -> one pre-norm encoder block (nn.MultiheadAttention, MLP) -> head.
    LayerNorm is nn.Identity: not supported yet."""

    def __init__(self, dim=16, heads=2, batch_first=True):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) / 2)
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, dim) / 2)
        self.norm = nn.Identity()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(dim, 32), nn.GELU(), nn.Linear(32, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.patch(x)
        n = x.shape[0]
        x = x.reshape(n, x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + self.pos_embedding
        y = self.norm(x)
        if not self.attention.batch_first:
            y = y.transpose(0, 1)
        attended, _ = self.attention(y, y, y)
        x = x + (attended if self.attention.batch_first else attended.transpose(0, 1))
        x = x + self.mlp(x)
        return self.head(x[:, 0])


@pytest.mark.parametrize("batch_first", (True, False))
def test_vit_style_model(batch_first, tmp_path):
    torch.manual_seed(0)
    model, x = TinyViT(batch_first=batch_first).eval(), _batches((4, 3, 16, 16), 1)[0]
    qat = quant.prepare_qat_fx(model, {"": INT8}, example_inputs=(x,))
    names = dict(qat.named_modules())
    assert names["attention_in_proj"].layer.weight is qat.attention.in_proj_weight  # the module's own parameters
    qat = calibrate(qat, _batches((4, 3, 16, 16)))
    qat.train()  # QAT trains through the rewritten attention, into the class token
    quant.set_fake_quant_state(qat, "qat")
    qat(x).sum().backward()
    assert qat.class_token.grad is not None and qat.attention.in_proj_weight.grad is not None
    quant.set_fake_quant_state(qat, "validation")
    qmodel = quant.convert(qat.eval())
    with torch.no_grad():
        expected, out = model(x), qmodel(x)
    assert _cosine(out, expected) > 0.97
    program = _program_checks(qmodel, x, tmp_path)  # batch 1 too: the class token follows the batch
    ops = [n.op for n in program.nodes]
    assert ops.count("expand_batch") == 1 and ops.count("matmul") == 2 and ops.count("softmax_lut") == 1
    assert _cosine(_onnx(qmodel, x, tmp_path), out) > 0.99


def test_multihead_attention_weights_and_masks_are_refused():
    class Weights(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            out, weights = self.attention(x, x, x)
            return out + weights.mean()

    with pytest.raises(quant.QuantizationError, match=r"attention weights used.*need_weights=False"):
        quant.prepare_qat_fx(Weights(), example_inputs=(torch.randn(2, 3, 8),))


def _torchvision_vit(layer_norm: bool) -> nn.Module:
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight, std=0.3)  # torchvision starts the head at zero
    if not layer_norm:
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.LayerNorm):
                    setattr(module, name, nn.Identity())
    return model


def test_torchvision_vision_transformer(tmp_path):
    """torchvision's VisionTransformer as it is: class token, position embedding, nn.MultiheadAttention(batch_first=True,
    need_weights=False) and its LayerNorms."""
    torch.manual_seed(0)
    x = _batches((2, 3, 32, 32), 1)[0]
    model = _torchvision_vit(layer_norm=True)
    qat = quant.prepare_qat_fx(model, {"": INT8}, example_inputs=(x,))
    qat = calibrate(qat, _batches((2, 3, 32, 32)))
    qmodel = quant.convert(qat)
    with torch.no_grad():  # int8 everywhere in a random 16-wide transformer: QAT itself is ~0.95 from float
        assert _cosine(qmodel(x), qat(x)) > 0.99 and _cosine(qmodel(x), model(x)) > 0.9
    _program_checks(qmodel, x, tmp_path)
