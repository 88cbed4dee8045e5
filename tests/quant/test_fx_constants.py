"""prepare_qat_fx on code that computes from the model's own tensors (Swin v2's patterns): a bias computed in
forward, a module applied to a buffer, F.normalize. Float where it touches only constants, quantized where it meets
activations, bit-exact in the program."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hat import backend, quant
from hat.quant.module_table import qat_op
from tests.backend.conftest import calibrate_and_convert


class ComputedBias(nn.Module):
    """Swin v2's qkv: F.linear with a bias cloned from a parameter with a part zeroed in place."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 8) * 0.3)
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x):
        bias = self.bias.clone()
        bias[2:4].zero_()
        return F.linear(x, self.weight, bias)


class TableMLP(nn.Module):
    """Swin v2's continuous position bias: an MLP on a fixed coordinate table, added to the activations."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1, bias=False))
        self.register_buffer("table", torch.linspace(-1, 1, 16).reshape(8, 2))

    def forward(self, x):
        return self.fc(x) + 4 * torch.sigmoid(self.mlp(self.table).flatten())


class Normalized(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.normalize(self.fc(x), dim=-1)


def _through(model, min_cosine=0.99):
    torch.manual_seed(1)
    batches = [torch.randn(4, 3, 8) for _ in range(3)]
    qmodel = calibrate_and_convert(model.eval(), batches, fx=True)
    program = backend.compile(qmodel, (batches[0],))
    for x in (batches[1], batches[2][:1]):
        assert torch.equal(program.run(x), qmodel(x))
    with torch.no_grad():  # moving-average ranges clip a batch's extremes: compare by cosine
        assert F.cosine_similarity(qmodel(batches[1]).flatten(), model(batches[1]).flatten(), dim=0) > min_cosine
    return program


def test_a_bias_computed_from_parameters_is_added_after_the_linear():
    torch.manual_seed(0)
    model = ComputedBias()
    program = _through(model)
    assert [n.op for n in program.nodes].count("add") == 1  # the bias, quantized where it meets the output
    qat = quant.prepare_qat_fx(model, None, example_inputs=(torch.randn(2, 3, 8),))
    assert qat.bias is model.bias or torch.equal(qat.bias, model.bias)  # still the model's parameter, trained


def test_a_module_on_a_buffer_stays_float_and_its_output_is_a_program_constant():
    torch.manual_seed(0)
    model = TableMLP()
    qat = quant.prepare_qat_fx(model, None, example_inputs=(torch.randn(2, 3, 8),))
    first = qat.get_submodule("mlp.0")
    assert qat_op(first) is None and getattr(first, "hat_constant", False)  # float: not swapped for QAT modules
    out = qat(torch.randn(2, 3, 8))
    out.sum().backward()
    assert all(p.grad is not None for p in first.parameters())  # it trains in float
    program = _through(model)
    assert "linear" in {n.op for n in program.nodes} and sum(v.constant for v in program.values.values()) >= 1


def test_f_normalize_becomes_a_sum_of_squares_and_a_reciprocal_square_root_table():
    torch.manual_seed(0)
    program = _through(Normalized())
    assert {"mul", "mean", "lookup"} <= {n.op for n in program.nodes} or \
        {"mul", "mean", "segment_lookup"} <= {n.op for n in program.nodes}


def test_other_norms_than_l2_are_refused_with_the_line():
    class L1(nn.Module):
        def forward(self, x):
            return F.normalize(x, p=1.0, dim=-1)

    with pytest.raises(quant.QuantizationError, match=r"p=1.0 in test_fx_constants\.py:\d+"):
        quant.prepare_qat_fx(L1(), None, example_inputs=(torch.randn(2, 8),))


def test_f_normalize_of_an_all_zero_row_is_zero_and_finite():
    """Swin v2 at 64x64: padded windows give keys of exactly 0; their sum of squares is floored at one step, so the
    reciprocal square root table (and its observer) never sees rsqrt(0) = inf."""
    torch.manual_seed(0)
    model = Normalized().eval()
    batches = [torch.randn(4, 3, 8) for _ in range(3)]
    for x in batches:
        x[:, 0] = 0  # a padded token
    with torch.no_grad():
        model.fc.bias.zero_()  # its features are exactly 0: rows of zeros to normalize
    qat = quant.prepare_qat_fx(model, None, example_inputs=(batches[0],))
    quant.set_fake_quant_state(qat, "calibration")
    for x in batches:
        qat(x)
    quant.set_fake_quant_state(qat, "qat")
    out = qat(batches[0])
    out.sum().backward()
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))  # zero in, zero out
    assert torch.isfinite(out).all() and all(torch.isfinite(p.grad).all() for p in qat.parameters()
                                             if p.grad is not None)
