"""The march travels with the model: config quant.march -> qconfig -> QAT modules -> quantized modules -> checker
and program. A second profile (a narrow 8-bit multiplier) shows that no stage falls back to J5 on its own."""
import dataclasses

import pytest
import torch
from torch import nn

from hat import backend, quant
from hat.backend.j5.program import TENSOR_REF
from hat.engine.quant_stages import qconfig_dict_from_config
from hat.integer import profile as profiles
from hat.models import create_model
from hat.quant.quantized import QuantizedConv2d, QuantizedFloatFunctional, QuantizedQuantStub

from tests.backend.conftest import calibrate_and_convert

NARROW = dataclasses.replace(profiles.J5, march="narrow", multiplier_max=127)


@pytest.fixture
def narrow(monkeypatch):
    monkeypatch.setitem(profiles._PROFILES, "narrow", NARROW)
    return NARROW


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = quant.QuantStub(), quant.DeQuantStub()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.add = quant.FloatFunctional()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        y = self.conv1(self.quant(x)).relu()
        return self.dequant(self.pool(self.add.add(self.conv2(y), y)))


def _convert(march: str) -> nn.Module:
    torch.manual_seed(0)
    qconfig = quant.get_default_qat_qconfig(march=march)
    return calibrate_and_convert(_Residual(), [torch.randn(4, 1, 8, 8) for _ in range(3)], {"": qconfig})


def test_every_stage_follows_the_qconfigs_march(narrow):
    qmodel = _convert("narrow")
    layers = [m for m in qmodel.modules() if isinstance(m, (QuantizedConv2d, QuantizedFloatFunctional,
                                                            QuantizedQuantStub))]
    assert len(layers) == 4 and all(m.profile is narrow for m in layers)
    x = torch.randn(2, 1, 8, 8)
    program = backend.compile(qmodel, (x,), march="narrow")
    assert program.march == "narrow" and 0 < max(_multipliers(program)) <= 127  # J5's reach 16384..32767
    assert max(_multipliers(backend.compile(_convert("bayes"), (x,), march="bayes"))) > 127
    with torch.no_grad():
        assert torch.equal(program.run(x), qmodel(x))


def _multipliers(program) -> list[int]:
    """|multiplier| of every requantization in the program (tensor parameters are stored by reference)."""
    found = []
    for node in program.nodes:
        for key in ("multiplier", "y_multiplier"):
            value = node.params.get(key)
            if isinstance(value, dict):
                value = program.tensors[value[TENSOR_REF]]
            if value is not None:
                found += [abs(int(m)) for m in torch.as_tensor(value).reshape(-1)]
    return found


def test_checking_for_another_march_says_which_one_the_model_was_built_for(narrow):
    report = backend.check_model(_convert("narrow"), (torch.randn(2, 1, 8, 8),), march="bayes")
    assert not report.deployable
    assert "converted for march 'narrow'" in str(report) and "quant.march" in str(report)


def test_a_model_with_two_marches_is_refused_at_prepare(narrow):
    qconfig_dict = {"": quant.get_default_qat_qconfig(march="bayes"),
                    "module_name": [("conv2", quant.get_default_qat_qconfig(march="narrow"))]}
    with pytest.raises(quant.QuantizationError, match="mix marches 'bayes'.*'narrow' \\(e.g. conv2\\)"):
        quant.prepare_qat(_Residual(), qconfig_dict)


def test_the_configs_march_reaches_every_qconfig(narrow, digits_cfg):
    cfg = digits_cfg("quant.march=narrow", "quant.high_precision_outputs=[head.2]")
    model = create_model("convnet_small", num_classes=10)
    qconfig_dict = qconfig_dict_from_config(cfg, model)
    named = [qconfig for _, qconfig in qconfig_dict["module_name"] if qconfig is not None]
    assert qconfig_dict[""].march == "narrow" and named and all(q.march == "narrow" for q in named)


def test_set_march_is_only_the_default_of_new_qconfigs(narrow):
    made_before = quant.get_default_qat_qconfig()
    quant.set_march("narrow")
    try:
        assert quant.get_default_qat_qconfig().march == "narrow" and made_before.march == "bayes"
    finally:
        quant.set_march("bayes")
    with pytest.raises(ValueError, match="unknown march 'bayes2'"):
        quant.set_march("bayes2")
