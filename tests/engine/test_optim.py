"""LR schedules stepped per optimizer step: warmup, cosine, step milestones, OneCycle peak."""
import pytest
import torch

from hat.errors import RegistryError
from hat.registry import build


def _lrs(cfg, epochs=4, steps=10, lr=0.1):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = build(cfg, "scheduler", kind="scheduler", optimizer=optimizer, epochs=epochs, steps_per_epoch=steps)
    lrs = []
    for _ in range(epochs * steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_with_warmup():
    lrs = _lrs({"type": "CosineLR", "warmup_epochs": 1, "min_lr_ratio": 0.1})
    assert lrs[0] == pytest.approx(0.1 / 10) and lrs[9] == pytest.approx(0.1)  # linear warmup over 10 steps
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[11] == pytest.approx(0.1 * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 30)).item())))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] > 0.01 > 0  # decays toward min_lr_ratio


def test_step_milestones():
    lrs = _lrs({"type": "StepLR", "milestones": [1, 3], "gamma": 0.5})
    assert lrs[9] == 0.1 and lrs[10] == pytest.approx(0.05) and lrs[29] == pytest.approx(0.05)
    assert lrs[30] == pytest.approx(0.025)


def test_onecycle_peaks_at_the_configured_lr():
    lrs = _lrs({"type": "OneCycleLR", "pct_start": 0.25})
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 9
    assert lrs[0] == pytest.approx(0.1 / 25) and lrs[-1] < 1e-4


def test_bad_schedule_values_are_config_errors():
    with pytest.raises(RegistryError, match=r"scheduler\.milestones: expected Sequence\[int\], got str 'abc'"):
        _lrs({"type": "StepLR", "milestones": "abc"})
    with pytest.raises(RegistryError, match="scheduler: OneCycleLR rejected its arguments: .*pct_start"):
        _lrs({"type": "OneCycleLR", "pct_start": 2.0})
