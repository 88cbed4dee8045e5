import math

import pytest
import torch

from hat import quant
from hat.models import create_model
from hat.quant.observer import synchronized_observers
from hat.quant import (FakeQuantize, LSQFakeQuantize, MinMaxObserver, MovingAverageMinMaxObserver,
                       MovingAveragePerChannelMinMaxObserver, PACTFakeQuantize, set_fake_quant_state)


def _with_scale(fq, scale):
    fq.scale.data = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    fq.observer_enabled.fill_(0)
    return fq


def test_observer_scale_is_amax_over_127_5():
    obs = MinMaxObserver()
    obs(torch.tensor([-3.0, 1.0]))
    obs(torch.tensor([2.0, 5.1]))
    assert obs.calculate_scale().item() == pytest.approx(5.1 / 127.5)
    assert MinMaxObserver("qint16").calculate_scale().item() == 1.0  # nothing observed yet


def test_moving_average_and_per_channel_observers():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
    obs(torch.tensor([-1.0, 1.0]))
    obs(torch.tensor([-3.0, 5.0]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-2.0, 3.0)
    per_channel = MovingAveragePerChannelMinMaxObserver(averaging_constant=1.0)
    per_channel(torch.tensor([[1.0, -2.0], [0.5, 0.25]]))
    torch.testing.assert_close(per_channel.calculate_scale(), torch.tensor([2.0, 0.5]) / 127.5)


@pytest.mark.parametrize("dtype,qrange", [("qint8", (-128, 127)), ("qint16", (-32768, 32767))])
def test_forward_and_gradient_equal_torch_per_tensor_with_half_even(dtype, qrange):
    x = (torch.randn(1000) * 3).requires_grad_()
    fq = _with_scale(FakeQuantize(dtype=dtype, rounding="half_even"), 2.0 ** -5 if dtype == "qint8" else 2.0 ** -12)
    ours = fq(x)
    ours.sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    ref = torch.fake_quantize_per_tensor_affine(ref_x, fq.scale.item(), 0, *qrange)
    ref.sum().backward()
    assert torch.equal(ours, ref) and torch.equal(x.grad, ref_x.grad)
    assert 0 < x.grad.sum() < 1000  # some values saturate


def test_forward_and_gradient_equal_torch_per_channel_with_half_even():
    w = (torch.randn(4, 3, 3, 3) * 2).requires_grad_()
    scales = torch.tensor([2.0 ** -6, 2.0 ** -5, 2.0 ** -4, 2.0 ** -7])
    fq = _with_scale(FakeQuantize(MovingAveragePerChannelMinMaxObserver, ch_axis=0, rounding="half_even"), scales)
    ours = fq(w)
    (ours * torch.arange(w.numel()).view_as(w)).sum().backward()
    ref_w = w.detach().clone().requires_grad_()
    ref = torch.fake_quantize_per_channel_affine(ref_w, scales, torch.zeros(4, dtype=torch.int32), 0, -128, 127)
    (ref * torch.arange(w.numel()).view_as(w)).sum().backward()
    assert torch.equal(ours, ref) and torch.equal(w.grad, ref_w.grad)


def test_j5_rounds_half_up_where_torch_rounds_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])  # exact ties with scale 1
    j5 = _with_scale(FakeQuantize(), 1.0)
    assert j5.rounding == "half_up"
    assert j5(x).tolist() == [1, 2, 3, 0, -1, -2]
    assert _with_scale(FakeQuantize(rounding="half_even"), 1.0)(x).tolist() == [0, 2, 2, -0, -2, -2]
    with pytest.raises(ValueError, match="rounding must be 'half_up' or 'half_even'"):
        FakeQuantize(rounding="nearest")


def _lsq_reference(x, s, qmin, qmax, grad_out, per_scale):
    """The paper's formulas, element by element in plain Python."""
    g = 1 / math.sqrt(per_scale * qmax)
    ds, dx = 0.0, []
    for xi, go in zip(x, grad_out):
        v = xi / s
        if v < qmin:
            ds, dxi = ds + qmin * go, 0.0
        elif v > qmax:
            ds, dxi = ds + qmax * go, 0.0
        else:
            ds, dxi = ds + (math.floor(v + 0.5) - v) * go, go
        dx.append(dxi)
    return ds * g, dx


def test_lsq_gradients_follow_the_paper_per_tensor():
    x = torch.tensor([-3.0, -0.26, -0.01, 0.07, 0.33, 1.9, 2.6]).requires_grad_()
    grad_out = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25, 2.0])
    fq = _with_scale(LSQFakeQuantize(dtype="qint8"), 0.02)
    fq.scale.requires_grad_()
    fq(x).backward(grad_out)
    ds, dx = _lsq_reference(x.tolist(), fq.scale.item(), -128, 127, grad_out.tolist(), x.numel())
    assert fq.scale.grad.item() == pytest.approx(ds, rel=1e-5)
    assert x.grad.tolist() == pytest.approx(dx)


def test_lsq_gradients_follow_the_paper_per_channel():
    w = torch.randn(3, 8).requires_grad_()
    grad_out = torch.randn(3, 8)
    fq = LSQFakeQuantize(MovingAveragePerChannelMinMaxObserver, ch_axis=0)
    set_fake_quant_state(fq, "calibration")
    fq(w.detach() * 0.5)  # calibrate on a narrower range so some values saturate
    set_fake_quant_state(fq, "qat")
    fq(w).backward(grad_out)
    for c in range(3):
        ds, dx = _lsq_reference(w[c].tolist(), fq.scale[c].item(), -128, 127, grad_out[c].tolist(), 8)
        assert fq.scale.grad[c].item() == pytest.approx(ds, rel=1e-4, abs=1e-7)
        assert w.grad[c].tolist() == pytest.approx(dx)


def test_pact_clips_and_learns_alpha():
    x = torch.tensor([-9.0, -2.0, 0.3, 4.0, 7.0, 12.0]).requires_grad_()
    grad_out = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    fq = PACTFakeQuantize(init_alpha=6.0)
    set_fake_quant_state(fq, "qat")
    y = fq(x)
    y.backward(grad_out)
    assert fq.alpha.grad.item() == pytest.approx(5.0 + 6.0 - 1.0)  # above alpha: +grad, below -alpha: -grad
    assert x.grad.tolist() == [0, 2, 3, 4, 0, 0]
    assert y.abs().max() <= 6.0 and y[1].item() == pytest.approx(round(-2.0 / (6 / 127.5)) * 6 / 127.5)


def test_states_set_the_flags():
    model = torch.nn.Sequential(FakeQuantize(), LSQFakeQuantize(), PACTFakeQuantize())
    expected = {"calibration": [(0, 1)] * 3, "qat": [(1, 1), (1, 0), (1, 0)], "validation": [(1, 0)] * 3}
    for state, flags in expected.items():
        set_fake_quant_state(model, state)
        assert [(int(m.fake_quant_enabled), int(m.observer_enabled)) for m in model] == flags, state
    with pytest.raises(ValueError, match="state must be one of calibration, qat, validation"):
        set_fake_quant_state(model, "train")


def test_calibration_observes_without_changing_values():
    fq = FakeQuantize()
    set_fake_quant_state(fq, "calibration")
    x = torch.randn(100)
    assert torch.equal(fq(x), x) and fq.scale.item() == pytest.approx(x.abs().max().item() / 127.5)


def test_repr_shows_the_flags_like_the_reference_toolchain():
    text = repr(FakeQuantize(MovingAveragePerChannelMinMaxObserver, ch_axis=0))
    assert "fake_quant_enabled=tensor([1], dtype=torch.uint8), observer_enabled=tensor([1], dtype=torch.uint8)" in text
    assert "quant_min=-128, quant_max=127, dtype=qint8, qscheme=torch.per_channel_symmetric, ch_axis=0" in text
    assert "(activation_post_process): MovingAveragePerChannelMinMaxObserver(" in text


def test_calibrated_per_channel_state_loads_into_a_fresh_module():
    fq = LSQFakeQuantize(MovingAveragePerChannelMinMaxObserver, ch_axis=0)
    fq(torch.randn(5, 3))
    fresh = LSQFakeQuantize(MovingAveragePerChannelMinMaxObserver, ch_axis=0)
    fresh.load_state_dict(fq.state_dict())
    assert torch.equal(fresh.scale, fq.scale) and fresh.scale.shape == (5,)
    assert torch.equal(fresh.activation_post_process.max_val, fq.activation_post_process.max_val)


@pytest.mark.parametrize("cls", [FakeQuantize, LSQFakeQuantize])
def test_forward_folded_equals_fake_quant_of_the_folded_weight(cls):
    """What a QAT conv+BN computes in training: fake_quant(W * f) / f, with negative and zero BN factors."""
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3)
    factor = torch.tensor([0.5, 2.0, -1.5, 0.0, 1e-3, 3.0])
    folded_fq, plain_fq = (cls(MovingAveragePerChannelMinMaxObserver, ch_axis=0, averaging_constant=1.0)
                           for _ in range(2))
    got = folded_fq.forward_folded(weight, factor)
    plain = plain_fq(weight * factor.view(-1, 1, 1, 1))
    torch.testing.assert_close(folded_fq.scale.detach(), plain_fq.scale.detach())  # the observer saw W * f
    nonzero = factor != 0
    torch.testing.assert_close(got[nonzero] * factor[nonzero].view(-1, 1, 1, 1), plain[nonzero], rtol=1e-5,
                               atol=1e-6)
    assert torch.equal(got[~nonzero], torch.zeros_like(got[~nonzero]))  # gamma = 0: the deployed weight is 0


def test_forward_folded_keeps_float32_state_for_float64_weights_across_calibration_and_qat():
    fq = FakeQuantize(MovingAveragePerChannelMinMaxObserver, ch_axis=0, averaging_constant=1.0)
    weight, factor = torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    fq.fake_quant_enabled.fill_(0)
    fq.forward_folded(weight, factor)  # calibration: observe only
    fq.fake_quant_enabled.fill_(1)
    fq.forward_folded(weight, factor)  # QAT: the fused op
    fq.fake_quant_enabled.fill_(0)
    fq.forward_folded(weight, factor)  # and back
    assert fq.scale.dtype == fq.activation_post_process.min_val.dtype == torch.float32


def test_lsq_scale_gradient_stays_finite_when_a_bn_factor_is_zero():
    fq = LSQFakeQuantize(MovingAveragePerChannelMinMaxObserver, ch_axis=0, averaging_constant=1.0)
    fq.scale = torch.nn.Parameter(torch.tensor([0.01, 0.02, 0.03, 0.04]))
    fq.observer_enabled.fill_(0)
    fq.forward_folded(torch.randn(4, 2, 3, 3), torch.tensor([0.5, 0.0, 2.0, 1.0])).sum().backward()
    assert torch.isfinite(fq.scale.grad).all() and fq.scale.grad[1] == 0


def test_synchronized_observers_are_the_activation_observers_only_and_only_inside_the_block():
    model = quant.prepare_qat(create_model("convnet_small"), {"": quant.get_default_qat_qconfig(),
                                                             "module_name": [("loss", None)]})
    with synchronized_observers(model):
        synced = {name for name, m in model.named_modules() if isinstance(m, MinMaxObserver) and m.sync_ranks}
    assert synced and not any("weight_fake_quant" in name for name in synced)
    assert "quant.activation_post_process.activation_post_process" in synced
    assert not any(m.sync_ranks for m in model.modules() if isinstance(m, MinMaxObserver))
