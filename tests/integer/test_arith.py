import random

import pytest
import torch

from hat.integer.profile import J5, get_profile
from hat.integer.arith import multiplier_and_shift, round_to_grid, saturate, shift_right_round
from hat.integer.kernels import requantize


def test_profile_facts():
    assert J5.march == "bayes" and J5.rounding == "half_up"
    assert J5.qrange("qint8") == (-128, 127) and J5.qrange("qint16") == (-32768, 32767)
    assert J5.scale_divisor("qint8") == 127.5 and J5.multiplier_max == 32767
    assert get_profile("bayes") is J5
    with pytest.raises(ValueError, match="unknown march 'bernoulli'; known: bayes"):
        get_profile("bernoulli")
    with pytest.raises(ValueError, match="unknown quantized dtype 'qint4'"):
        J5.qrange("qint4")


def test_half_up_and_half_even_differ_only_at_ties():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.4, -0.6])
    assert round_to_grid(x, "half_up").tolist() == [-2, -1, 0, 1, 2, 3, 0, -1]
    assert round_to_grid(x, "half_even").tolist() == [-2, -2, -0, 0, 2, 2, 0, -1]


def test_shift_right_round_is_floor_of_half_up_division():
    gen = random.Random(0)
    values = [gen.randint(-2**40, 2**40) for _ in range(500)] + [-3, -2, -1, 0, 1, 2, 3]
    for n in (0, 1, 2, 7, 15, 31):
        got = shift_right_round(torch.tensor(values), n).tolist()
        want = [v if n == 0 else (2 * v + 2**n) // 2**(n + 1) for v in values]
        assert got == want, n


def test_multiplier_fits_int16_and_approximates_the_ratio():
    ratios = torch.tensor([1e-6, 3.1e-4, 0.0123, 0.5, 0.99999, 1.0, 1.7, 300.0, 32767.0, -0.25])
    m, n = multiplier_and_shift(ratios, J5)
    assert (m.abs() <= 32767).all() and ((n >= 0) & (n <= 31)).all()
    approx = m.double() / 2.0 ** n.double()
    rel = ((approx - ratios.double()) / ratios.double()).abs()
    assert (rel[ratios.abs() > 1e-5] < 2 ** -14).all()
    assert (m.abs()[ratios.abs() > 1e-5] >= 16384).all()  # the largest shift is used: the multiplier is full


def test_requantize_matches_exact_integer_arithmetic_and_saturates():
    gen = torch.Generator().manual_seed(0)
    acc = torch.randint(-2**31, 2**31 - 1, (4, 64), generator=gen)
    ratio = torch.tensor([1e-4, 3e-5, 2e-3, 1e-9])
    m, n = multiplier_and_shift(ratio, J5)
    out = requantize(acc, m, n, "qint8", axis=0).long()
    for c in range(4):
        for v, got in zip(acc[c].tolist(), out[c].tolist()):
            mi, ni = int(m[c]), int(n[c])
            exact = (v * mi + (1 << (ni - 1) if ni else 0)) >> ni
            assert got == max(-128, min(127, exact))
    assert out.min() == -128 and out.max() == 127  # large accumulators saturate
    assert saturate(torch.tensor([40000, -40000]), "qint16").tolist() == [32767, -32768]
