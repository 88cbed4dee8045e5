import pytest
import torch
from torch import nn

from hat import quant
from hat.models import create_model


def test_default_qconfig_builds_the_documented_fake_quants():
    qc = quant.get_default_qat_qconfig()
    act, weight = qc.activation(), qc.weight()
    assert isinstance(act, quant.FakeQuantize) and act.dtype == "qint8" and act.ch_axis is None
    assert weight.dtype == "qint8" and weight.ch_axis == 0 and weight.qscheme == "torch.per_channel_symmetric"
    assert quant.get_default_qat_qconfig(activation_dtype="qint16").activation().quant_max == 32767
    assert isinstance(quant.get_default_qat_qconfig(algorithm="lsq").weight(), quant.LSQFakeQuantize)
    assert isinstance(quant.get_default_qat_qconfig(algorithm="pact").activation(), quant.PACTFakeQuantize)
    out = quant.get_default_qat_out_qconfig()
    assert out.activation is None and out.describe() == ("qint32 (high precision)", "qint8")


def test_unsupported_choices_name_the_allowed_values():
    with pytest.raises(ValueError, match="activation_dtype must be one of qint8, qint16 on march 'bayes', got 'qint4'"):
        quant.get_default_qat_qconfig(activation_dtype="qint4")
    with pytest.raises(ValueError, match="weight_dtype must be one of qint8"):
        quant.get_default_qat_qconfig(weight_dtype="qint16")
    with pytest.raises(ValueError, match="algorithm must be one of fake_quant, lsq, pact"):
        quant.get_default_qat_qconfig(algorithm="adaround")


def _model():
    return create_model("convnet_small")  # backbone.0.0 conv, backbone.0.1 bn, backbone.0.2 relu, ..., head.2 linear


def test_priority_global_type_name_attribute():
    model = _model()
    qc8, qc16, out = (quant.get_default_qat_qconfig(), quant.get_default_qat_qconfig(activation_dtype="qint16"),
                      quant.get_default_qat_out_qconfig())
    model.backbone[2][0].qconfig = None  # an attribute beats everything
    resolved = quant.resolve_qconfigs(model, {"": qc8, "module_type": [(nn.Conv2d, qc16)],
                                              "module_name": [("backbone.1.0", out), ("head", out)]})
    assert resolved["backbone.0.0"] is qc16  # type over global
    assert resolved["backbone.1.0"] is out  # name over type
    assert resolved["backbone.0.1"] is qc8  # global
    assert resolved["head.2"] is out  # inherited from the named parent
    assert resolved["backbone.2.0"] is None


def test_module_name_matching_nothing_lists_the_nearest_names():
    with pytest.raises(ValueError, match=r"no module named 'head\.fc' in the model; nearest names: head\.2, head\.1, head\.0"):
        quant.resolve_qconfigs(_model(), {"module_name": [("head.fc", None)]})


def test_malformed_qconfig_dict():
    with pytest.raises(ValueError, match="unknown key.*'module_types'"):
        quant.resolve_qconfigs(_model(), {"module_types": []})
    with pytest.raises(ValueError, match="module_type entries take a module class"):
        quant.resolve_qconfigs(_model(), {"module_type": [("Conv2d", None)]})
    with pytest.raises(ValueError, match=r"\['module_name'\]\[0\] must be a \(target, qconfig\) pair"):
        quant.resolve_qconfigs(_model(), {"module_name": ["head.2"]})


def test_march_switch_is_validated():
    assert quant.get_march() == "bayes"
    with pytest.raises(ValueError, match="unknown march 'bernoulli'"):
        quant.set_march("bernoulli")
    quant.set_march("bayes")
    assert torch.equal(quant.get_default_qat_qconfig().activation().zero_point, torch.tensor([0], dtype=torch.int32))
