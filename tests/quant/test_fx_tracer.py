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


def masked_scores(x: torch.Tensor, size: int) -> torch.Tensor:
    """Swin's pattern: a mask built from shapes by item assignment, added to scores; marked opaque for torch.fx."""
    mask = x.new_zeros((x.shape[-2], x.shape[-1]))
    mask[: size // 2, :] = -4.0
    mask[size // 2:, : size // 2] = 1.5
    return (x * 2 + mask.unsqueeze(0).unsqueeze(0)).softmax(-1)


torch.fx.wrap("masked_scores")


class WrappedMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return masked_scores(self.conv(x), x.shape[-1])


def test_fx_wrapped_code_is_traced_through_and_a_shape_built_mask_stays_float():
    torch.manual_seed(0)
    batches = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    graph = quant_friendly(WrappedMask().eval(), (batches[0],), stubs=False)
    assert masked_scores not in {n.target for n in graph.graph.nodes}  # traced through, not one opaque call
    assert any(n.target == "new_zeros" for n in graph.graph.nodes)  # the mask: float code, not quantized ops
    model = WrappedMask().eval()
    qmodel = calibrate_and_convert(model, batches, fx=True)
    program = backend.compile(qmodel, (batches[0],), march="bayes")
    for batch in (batches[1], batches[2][:1]):
        assert torch.equal(program.run(batch), qmodel(batch))
    torch.testing.assert_close(qmodel(batches[1]), model(batches[1]), atol=0.05, rtol=0)


def test_new_tensors_from_a_qtensor_are_plain_float_tensors():
    from hat.quant.qtensor import QTensor
    from hat.integer.profile import get_profile

    q = QTensor(torch.ones(2, 3), torch.tensor(0.1), "qint8", profile=get_profile("bayes"))
    assert q.new_zeros((4, 5)).dtype == torch.float32 and q.new_ones(2).sum() == 2
    assert q.new_full((2,), 3.0).tolist() == [3.0, 3.0] and q.new_empty(3).shape == (3,)
    assert q.new_zeros(2, dtype=torch.int64).dtype == torch.int64
