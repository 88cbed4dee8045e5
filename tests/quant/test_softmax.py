"""softmax and log_softmax over a dim, int8 and int16 activations, eager (nn.Softmax) and graph mode (F.softmax):
QAT tracks the quantized model, the program is bit-exact with it (after a .hir round trip too), the checker passes,
the ONNX QDQ form runs in onnxruntime within a few output steps, and what cannot be quantized is refused clearly."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hat import backend, quant
from hat.backend.j5.irfile import IRFileError
from hat.integer import kernels, lut
from hat.integer.profile import J5
from hat.quant.onnx_helper import export_quantized_onnx
from hat.quant.qtensor import QuantizationError
from tests.backend.test_irfile import _rewrite

ROOT = Path(__file__).resolve().parents[2]
OPS = ("softmax", "log_softmax")
DTYPES = ("qint8", "qint16")


class EagerNet(nn.Module):
    """QuantStub -> conv -> nn.Softmax / nn.LogSoftmax -> DeQuantStub, on [N, 3, 5, 5]."""

    def __init__(self, op, dim):
        super().__init__()
        self.quant, self.conv, self.dequant = quant.QuantStub(), nn.Conv2d(3, 4, 1), quant.DeQuantStub()
        self.op = (nn.LogSoftmax if op == "log_softmax" else nn.Softmax)(dim)

    def forward(self, x):
        return self.dequant(self.op(self.conv(self.quant(x))))


class PlainNet(nn.Module):
    """A plain torch model (linear -> softmax call) for prepare_qat_fx, on [N, 3, 6]."""

    def __init__(self, op, dim):
        super().__init__()
        self.fc, self.op, self.dim = nn.Linear(6, 5), op, dim

    def forward(self, x):
        y = self.fc(x)
        return F.softmax(y, dim=self.dim) if self.op == "softmax" else y.log_softmax(self.dim)


def _inputs(build, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (4, 3, 5, 5) if build == "eager" else (4, 3, 6)
    return 2 * torch.randn(*shape, generator=generator)


def _model(build, op, dim):
    torch.manual_seed(0)
    model = (EagerNet if build == "eager" else PlainNet)(op, dim).eval()
    with torch.no_grad():  # logits of a few units: softmax far from uniform
        (model.conv if build == "eager" else model.fc).weight.mul_(3)
    return model


def _converted(build, op, dim, dtype):
    """(QAT model in eval/validation, quantized model), calibrated on three batches."""
    model, qconfig_dict = _model(build, op, dim), {"": quant.get_default_qat_qconfig(activation_dtype=dtype)}
    qat = (quant.prepare_qat(model, qconfig_dict) if build == "eager"
           else quant.prepare_qat_fx(model, qconfig_dict, example_inputs=(_inputs(build),)))
    quant.set_fake_quant_state(qat, "calibration")
    qat.eval()
    with torch.no_grad():
        for seed in range(3):
            qat(_inputs(build, seed))
    quant.set_fake_quant_state(qat, "validation")
    return qat, quant.convert(qat)


def _softmax_module(qmodel):
    return next(m for m in qmodel.modules() if type(m).__name__ == "QuantizedSoftmax")


def _cosine(a, b):
    return float(F.cosine_similarity(a.detach().flatten().double(), b.detach().flatten().double(), dim=0))


@pytest.mark.parametrize("build", ("eager", "fx"))
@pytest.mark.parametrize("dim", (1, -1))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_softmax_through_every_stage(op, dtype, dim, build, tmp_path):
    qat, qmodel = _converted(build, op, dim, dtype)
    x = _inputs(build, seed=7)
    with torch.no_grad():
        expected, fake, out = _model(build, op, dim)(x), qat(x), qmodel(x)
    assert _cosine(fake, out) > 0.99  # QAT tracks the integer kernel
    assert _cosine(out, expected) > 0.99
    module = _softmax_module(qmodel)
    assert module.log == (op == "log_softmax")
    report = backend.check_model(qmodel, (x,))
    assert report.deployable, str(report)
    program = report.program
    assert [n.op for n in program.nodes].count("softmax_lut") == 1
    node = next(n for n in program.nodes if n.op == "softmax_lut")
    assert node.params["dim"] == dim % x.ndim and node.params["log"] == (op == "log_softmax")
    assert (node.params["exp_table"] is None) == (dtype == "qint16")  # segmented exp tables for an int16 input
    loaded = backend.load(program.save(tmp_path / "m.hir"))
    for batch in (x, x[:1]):
        reference = qmodel(batch)
        assert torch.equal(program.run(batch), reference) and torch.equal(loaded.run(batch), reference)
    ort = pytest.importorskip("onnxruntime")
    path = export_quantized_onnx(qmodel, (x,), tmp_path / "m.onnx")
    options = ort.SessionOptions()  # the QDQ graph as written: onnxruntime's integer fusions are off by tens of steps
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # here (QLinearConv, 3-d MatMul)
    session = ort.InferenceSession(str(path), options)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    steps = (got - program.run(x)).abs() / float(module.out_scale)
    # float softmax vs the tables (1 step int8, 4 int16), plus the layer before: ONNX requantizes it in float with
    # half-even rounding, a step off at times, which moves the softmax by up to s_in / (2 s_out) output steps
    s_in = program.values[node.inputs[0]].scale[0]
    assert steps.max() <= (1 if dtype == "qint8" else 4) + s_in / (2 * float(module.out_scale)) + 1e-3
    assert steps.mean() < 0.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_softmax_rows_sum_to_one(dtype):
    _, qmodel = _converted("eager", "softmax", 1, dtype)
    out = qmodel(_inputs("eager", seed=5))
    step = float(_softmax_module(qmodel).out_scale)
    sums = out.double().sum(1)
    assert (out >= 0).all() and ((sums - 1).abs() <= 4 * step + 1e-6).all()


@pytest.mark.parametrize("log", (False, True))
@pytest.mark.parametrize("in_dtype, out_dtype, amax", [("qint8", "qint8", 8.0), ("qint16", "qint16", 8.0),
                                                       ("qint16", "qint16", 30.0), ("qint16", "qint8", 2.0)])
def test_kernel_stays_within_a_few_steps_of_float64(in_dtype, out_dtype, amax, log):
    """The kernel against float64 softmax of the same integers: int8 outputs within one step of the rounded value,
    int16 within the int16 exp grid's few steps (d_shift 1 covers a fine int16 input; amax 30 needs none)."""
    generator = torch.Generator().manual_seed(0)
    qmax = 127 if in_dtype == "qint8" else 32767
    s_in = amax / (qmax + 0.5)
    xq = torch.floor(torch.randn(500, 6, generator=generator) * amax / 3 / s_in + 0.5).clamp(-qmax - 1, qmax)
    reference = (torch.log_softmax if log else torch.softmax)(xq.double() * s_in, 1)
    s_out = float(reference.abs().max()) / ((127.5 if out_dtype == "qint8" else 32767.5))
    params = lut.softmax_params(s_in, in_dtype, s_out, out_dtype, log=log, profile=J5)
    got = kernels.softmax_lut(xq.to(torch.int8 if in_dtype == "qint8" else torch.int16), dim=1, **params)
    steps = (got.double() - reference / s_out).abs()
    assert steps.max() <= (0.51 if out_dtype == "qint8" else (1.5 if log else 4.0)), float(steps.max())


def test_every_softmax_call_is_rewritten_by_prepare_qat_fx():
    class Calls(nn.Module):
        def forward(self, x):
            return (F.softmax(x, 1) + torch.softmax(x, dim=2) + x.softmax(-1) + F.log_softmax(x, dim=-1)
                    + torch.log_softmax(x, 1) + x.log_softmax(dim=2, dtype=None))

    x = _inputs("fx")
    qat = quant.prepare_qat_fx(Calls(), example_inputs=(x,))
    found = sorted((m.dim, m.log) for m in qat.modules() if type(m).__name__ == "QATSoftmax")
    assert found == [(1, False), (1, True), (2, False), (2, False), (2, True), (2, True)]


def test_softmax_over_the_batch_dim_is_refused_with_the_place_and_the_fix():
    with pytest.raises(QuantizationError, match=r"module 'op': softmax over dim 0, the batch dim: .* use a dim in "
                                                r"\[1, 3\]"):
        _converted("eager", "softmax", 0, "qint8")

    class Batch(nn.Module):
        def forward(self, x):
            return F.log_softmax(x, dim=0)

    with pytest.raises(QuantizationError, match=r"prepare_qat_fx \(test_softmax\.py:\d+: return F\.log_softmax\(x, "
                                                r"dim=0\)\): log_softmax over dim 0, the batch dim"):
        quant.prepare_qat_fx(Batch(), example_inputs=(_inputs("fx"),))


def test_dtype_argument_and_implicit_dim_are_refused():
    class WithDtype(nn.Module):
        def forward(self, x):
            return torch.softmax(x, 1, dtype=torch.float64)

    class NoDim(nn.Module):
        def forward(self, x):
            return F.softmax(x)

    with pytest.raises(QuantizationError, match=r"softmax\(\.\.\., dtype=torch\.float64\) in test_softmax\.py:\d+.*"
                                                r"remove dtype="):
        quant.prepare_qat_fx(WithDtype(), example_inputs=(_inputs("fx"),))
    with pytest.warns(UserWarning), pytest.raises(QuantizationError, match="without a dim .* give the dim"):
        quant.prepare_qat_fx(NoDim(), example_inputs=(_inputs("fx"),))


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.update(dim=0), "parameter 'dim'"),
    (lambda p: p.update(mantissa_table=None), "mantissa_table"),
    (lambda p: p.update(exp_table=None), "exp_table"),
    (lambda p: p.update(recip_shift=None), "needs parameter"),
    (lambda p: p.update(log=True), "needs parameter"),
    (lambda p: p.update(internal_dtype="qint8"), "internal_dtype"),
])
def test_edited_softmax_nodes_are_refused_at_load(edit, message, tmp_path):
    _, qmodel = _converted("eager", "softmax", 1, "qint8")
    path = backend.compile(qmodel, (_inputs("eager"),)).save(tmp_path / "m.hir")
    _rewrite(path, lambda h: edit(next(n for n in h["nodes"] if n["op"] == "softmax_lut")["params"]))
    with pytest.raises(IRFileError, match=message):
        backend.load(path)


def test_random_header_edits_of_softmax_programs_only_raise_irfile_error(tmp_path):
    """tests/backend/test_irfile_fuzz.py's fuzz on a softmax (int8) and a log_softmax (int16) program."""
    paths = []
    for op, dtype in (("softmax", "qint8"), ("log_softmax", "qint16")):
        _, qmodel = _converted("eager", op, 1, dtype)
        paths.append(str(backend.compile(qmodel, (_inputs("eager"),)).save(tmp_path / f"{op}.hir")))
    command = f"from tests.backend.test_irfile_fuzz import fuzz; fuzz({paths!r}, 40, 7, {4 << 30})"
    done = subprocess.run([sys.executable, "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["failures"] == [], "\n\n".join(result["failures"])
