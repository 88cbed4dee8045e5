"""prepare_qat_fx traces branches on shapes (decided by example_inputs) while the graph stays symbolic."""
import pytest
import torch
from torch import nn

from hat import backend, quant
from hat.quant.fx import quant_friendly

from tests.backend.conftest import calibrate_and_convert


class ShapeBranches(nn.Module):
    """The timm patterns: branches on ndim, channels, dtype and device; a loop over the shape; a flatten by size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.extra = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        if x.ndim == 3:
            x = x.unsqueeze(0)
        y = self.conv(x).relu()
        if y.shape[1] != 8 or y.dtype != torch.float32 or y.device.type != "cpu":
            y = y * 0
        for _ in range(y.dim() - 3):
            y = self.extra(y).relu()
        y = nn.functional.avg_pool2d(y, y.size(-1) // 4) if y.size(-1) > 4 else y
        return self.fc(y.reshape(y.shape[0], -1))


def test_shape_branches_follow_the_example_and_the_batch_stays_free():
    torch.manual_seed(0)
    model = ShapeBranches().eval()
    graph = quant_friendly(model, (torch.randn(2, 3, 8, 8),))
    for batch in (1, 5):  # traced at batch 2; the reshape still follows x.shape[0]
        x = torch.randn(batch, 3, 8, 8)
        torch.testing.assert_close(graph(x), model(x))
    called = [n.target for n in graph.graph.nodes if n.op == "call_module"]
    assert "extra" in called and "conv" in called  # the loop ran once for a 4-d input


def test_a_shape_branching_model_compiles_to_a_bit_exact_program():
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    qmodel = calibrate_and_convert(ShapeBranches().eval(), batches, fx=True)
    program = backend.compile(qmodel, (batches[0],), march="bayes")
    with torch.no_grad():
        assert torch.equal(program.run(batches[1]), qmodel(batches[1]))


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.shape[0] > 0 and y.mean() > 0:  # the shape part is fine; the value part is not
            y = -y
        return y


def test_a_branch_on_tensor_values_is_still_refused_with_the_line():
    with pytest.raises(quant.QuantizationError, match=r"test_fx_tracer\.py:\d+ in forward uses a tensor value in "
                                                      r"Python control flow \('gt_1' is computed from tensor values"):
        quant.prepare_qat_fx(ValueBranch(), None, example_inputs=(torch.randn(2, 3, 4, 4),))
