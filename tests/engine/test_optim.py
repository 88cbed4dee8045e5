"""LR schedules stepped per optimizer step (warmup, cosine, step milestones, OneCycle peak) and LR scaling."""
import pytest
import torch

from hat.engine.optim import optimizer_arguments, scaled_lr
from hat.errors import ConfigError, RegistryError
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


# LR scaling with the global batch (FAQ 2.3 Q1)
def _scaled(per_device=64, world=1, accum=1, samples_per_device=None, **optimizer):
    return scaled_lr({"type": "SGD", "lr": 0.1, **optimizer}, per_device, world, accum, samples_per_device)


@pytest.mark.parametrize("world,accum,rule,expected", [
    (1, 1, "linear", 0.1), (4, 1, "linear", 0.4), (2, 2, "linear", 0.4), (4, 1, "sqrt", 0.2), (4, 1, "none", 0.1)])
def test_lr_follows_the_global_batch(world, accum, rule, expected):
    lr, line = _scaled(world=world, accum=accum, base_batch_size=64, lr_scaling=rule)
    assert lr == pytest.approx(expected)
    assert f"global batch {64 * world * accum} = 64 per device x {world} processes x {accum} accumulation steps" in line


def test_lr_without_a_base_batch_is_used_as_given_and_says_so():
    lr, line = _scaled(world=8)
    assert lr == 0.1 and "unscaled: optimizer.base_batch_size is not set" in line


@pytest.mark.parametrize("bad,message", [({"lr_scaling": "quadratic"}, "optimizer.lr_scaling: 'quadratic'"),
                                         ({"base_batch_size": 0}, "optimizer.base_batch_size=0 must be a positive")])
def test_bad_lr_scaling_settings_are_config_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        _scaled(**bad)


def test_optimizer_arguments_drop_the_engine_keys():
    cfg = {"type": "SGD", "lr": 0.1, "base_batch_size": 64, "lr_scaling": "linear", "momentum": 0.8}
    assert optimizer_arguments(cfg, 0.4) == {"type": "SGD", "lr": 0.4, "momentum": 0.8}


def test_a_batch_larger_than_the_data_scales_by_the_batch_really_delivered():
    """batch_size 100000 on 1437 images used to scale the LR x1562; a step sees 1437 images."""
    lr, line = _scaled(per_device=100000, base_batch_size=64, samples_per_device=1437)
    assert lr == pytest.approx(0.1 * 1437 / 64)
    assert "global batch 1437 = 1437 per device" in line and "data.batch_size 100000 is larger than the 1437" in line


def test_accumulation_beyond_an_epoch_is_capped_at_the_epochs_batches():
    lr, line = _scaled(per_device=64, accum=1000, base_batch_size=64, samples_per_device=1437)
    assert lr == pytest.approx(0.1 * 23)  # a step accumulates the epoch's 23 batches of 64 (the last one short)
    assert "x 23 accumulation steps" in line and "trainer.accum_steps 1000 exceeds the 23 batches" in line
    assert _scaled(per_device=64, accum=4, base_batch_size=64, samples_per_device=1437)[0] == pytest.approx(0.4)


@pytest.mark.parametrize("lr", ["abc", 0, -0.1, float("inf"), True, None])
def test_the_lr_must_be_a_positive_number(lr):
    with pytest.raises(ConfigError, match=r"optimizer\.lr=.* must be a positive number"):
        scaled_lr({"type": "SGD", "lr": lr}, 64, 1, 1)


@pytest.mark.parametrize("cfg, message", [
    ({"type": "CosineLR", "min_lr_ratio": 2.0}, r"min_lr_ratio=2.0 must be in \[0, 1\]"),
    ({"type": "CosineLR", "min_lr_ratio": -0.5}, r"min_lr_ratio=-0.5 must be in \[0, 1\]"),
    ({"type": "StepLR", "gamma": 0}, "gamma=0 must be > 0"),
    ({"type": "StepLR", "milestones": [-1]}, "milestones=.-1. must be epochs >= 0"),
    ({"type": "ConstantLR", "warmup_epochs": -1}, "warmup_epochs=-1 must be >= 0"),
])
def test_schedule_arguments_out_of_range_are_config_errors(cfg, message):
    with pytest.raises(RegistryError, match=f"scheduler: {cfg['type']} rejected its arguments: {message}"):
        _lrs(cfg)


@pytest.mark.parametrize("args, message", [({"momentum": 1.0}, r"momentum=1.0 must be in \[0, 1\)"),
                                           ({"momentum": -0.1}, r"momentum=-0.1 must be in \[0, 1\)")])
def test_optimizer_arguments_out_of_range_are_config_errors(args, message):
    params = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(RegistryError, match=f"optimizer: SGD rejected its arguments: {message}"):
        build({"type": "SGD", "lr": 0.1, **args}, "optimizer", kind="optimizer", params=params)
