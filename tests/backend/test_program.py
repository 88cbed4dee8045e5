"""The integer program equals the quantized model in every element: zoo, torchvision, every op kind."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hat import backend, quant
from hat.backend import ProgramInputError
from hat.models import create_model, list_models
from hat.quant import DeQuantStub, FloatFunctional, QuantStub
from hat.quant.functional import grid_sample
from tests.conftest import zoo_model


def _assert_bit_exact(qmodel, prog, *inputs):
    """The program (fast executor), its reference kernels and the quantized model agree in every element."""
    expected, got, reference = qmodel(*inputs), prog.run(*inputs), prog.run(*inputs, reference=True)
    assert got.dtype == expected.dtype and torch.equal(got, expected) and torch.equal(reference, expected)


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_compiles_to_a_bit_exact_program(name, quantized, tmp_path):
    torch.manual_seed(0)
    model, shape = zoo_model(name)
    qmodel = quantized(model.deploy_model(), [torch.randn(8, *shape) for _ in range(2)])
    prog = backend.compile(qmodel, example_inputs=(torch.randn(4, *shape),))
    loaded = backend.load(prog.save(tmp_path / "model.hir"))
    other_batch = torch.randn(5, *shape) * 2  # another batch size; values beyond the calibrated range saturate
    _assert_bit_exact(qmodel, prog, other_batch)
    _assert_bit_exact(qmodel, loaded, other_batch)


@pytest.mark.parametrize("ctor", [torchvision.models.resnet18, torchvision.models.mobilenet_v2])
def test_torchvision_models_prepared_with_fx_compile_bit_exact(ctor, quantized):
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    qmodel = quantized(ctor(num_classes=10).eval(), batches, fx=True)
    prog = backend.compile(qmodel, example_inputs=(batches[0],))
    assert {"conv2d", "add", "linear", "global_avg_pool"} <= {n.op for n in prog.nodes}
    _assert_bit_exact(qmodel, prog, torch.randn(3, 3, 32, 32))


class EveryOp(nn.Module):
    """One of each quantized op kind a model can use, including the same-grid ops and two output dtypes."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant, self.dequant_hp = QuantStub(), DeQuantStub(), DeQuantStub()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.conv16 = nn.Conv2d(8, 8, 1)
        self.conv_grid = nn.Conv2d(8, 2, 1)
        self.add, self.sub, self.mul, self.cat = (FloatFunctional() for _ in range(4))
        self.add_scalar, self.mul_scalar = FloatFunctional(), FloatFunctional()
        self.fc = nn.Linear(8 * 4 * 4, 5)
        self.fc_hp = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        x = self.quant(x)
        a = self.conv(x)
        b = self.conv16(a)  # int16 output (qconfig below)
        s = self.add.add(a, F.relu(b))
        s = self.sub.sub(s, F.hardtanh(a, -1.0, 1.0))
        s = self.mul.mul(s, a)
        s = self.add_scalar.add_scalar(s, 0.25)
        s = self.mul_scalar.mul_scalar(s, -1.5)
        s = -(s * 2.0 + 0.1)
        offsets = F.max_pool2d(self.conv_grid(a), 2).permute(0, 2, 3, 1)
        g = grid_sample(F.max_pool2d(a, 2), offsets)
        pooled = F.avg_pool2d(s, 2)
        c = self.cat.cat([pooled, g], dim=1)[:, ::2]
        c = torch.cat([c, c], dim=1)[:, 0:8]
        c = F.interpolate(c, scale_factor=2)[..., 0:4, 1:5]
        flat = c.reshape(c.size(0), -1)
        return self.dequant(self.fc(F.dropout(flat, training=False))), self.dequant_hp(self.fc_hp(flat))


def test_every_op_kind_is_bit_exact_in_the_program(quantized, tmp_path):
    torch.manual_seed(0)
    qconfig_dict = {"": quant.get_default_qat_qconfig(),
                    "module_name": [("conv16", quant.get_default_qat_qconfig(activation_dtype="qint16")),
                                    ("fc_hp", quant.get_default_qat_out_qconfig())]}
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    qmodel = quantized(EveryOp(), batches, qconfig_dict)
    prog = backend.load(backend.compile(qmodel, example_inputs=(batches[0],)).save(tmp_path / "every.hir"))
    x = torch.randn(6, 3, 8, 8)
    expected, got, reference = qmodel(x), prog.run(x), prog.run(x, reference=True)
    assert all(torch.equal(e, g) and torch.equal(e, r) for e, g, r in zip(expected, got, reference))
    ops = {n.op for n in prog.nodes}
    assert ops >= {"quantize", "conv2d", "linear", "add", "mul", "add_scalar", "mul_scalar", "cat", "clip",
                   "add_steps", "identity", "max_pool2d", "avg_pool2d", "grid_sample", "index", "concat",
                   "resize_nearest", "layout", "dequantize"}
    assert {prog.values[n].dtype for n in prog.values} >= {"qint8", "qint16", "qint32", "float32"}


def test_program_refuses_inputs_it_was_not_compiled_for(quantized):
    qmodel = quantized(create_model("convnet_small").deploy_model(), [torch.randn(4, 1, 8, 8)])
    prog = backend.compile(qmodel, example_inputs=(torch.randn(2, 1, 8, 8),))
    with pytest.raises(ProgramInputError, match=r"compiled for \[N, 1, 8, 8\]"):
        prog.run(torch.randn(2, 1, 9, 9))
    with pytest.raises(ProgramInputError, match="float tensor"):
        prog.run(torch.zeros(2, 1, 8, 8, dtype=torch.int8))
    with pytest.raises(ProgramInputError, match="takes 1 input"):
        prog.run(torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8))


def test_wide_convs_accumulate_in_float32_chunks_and_stay_exact():
    from hat.integer.kernels import accumulate_plan, conv2d

    torch.manual_seed(0)
    weight = torch.randint(0, 128, (4, 512, 3, 3), dtype=torch.int8)  # same signs: no cancellation
    plan = accumulate_plan(weight, "qint8")
    assert plan["accumulate"] == "float32" and plan["splits"] > 1  # one float32 sum could exceed 2^24
    assert accumulate_plan(weight, "qint16") == {"accumulate": "float64", "splits": 1}
    x = torch.full((2, 512, 5, 5), -128, dtype=torch.int8)  # the worst case: every product at its largest
    x[1] = torch.randint(-128, 128, (512, 5, 5), dtype=torch.int8)
    args = dict(weight=weight, bias=torch.zeros(4, dtype=torch.long), stride=1, padding=1, dilation=1, groups=1,
                relu=False, multiplier=None, shift=None, acc_max=None, out_max=None, out_dtype="qint32")
    exact = torch.nn.functional.conv2d(x.double(), weight.double(), padding=1).round().long()  # below 2^53
    assert torch.equal(conv2d(x, **args).long(), exact)
    assert int(exact.abs().max()) > 2 ** 24  # so float32 in one piece would not have been exact
