import math

import torch

from hat import quant
from hat.models import create_model


def _models():
    torch.manual_seed(0)
    model = create_model("convnet_small").eval()
    qat = quant.prepare_qat(model, {"": quant.get_default_qat_qconfig(), "module_name": [("loss", None)]})
    quant.set_fake_quant_state(qat, "calibration")
    qat.eval()
    x = torch.randn(16, 1, 8, 8)
    qat(x)
    quant.set_fake_quant_state(qat, "validation")
    return model, qat, x


def test_compare_lists_every_common_layer_in_order_with_sqnr_and_cosine():
    model, qat, x = _models()
    report = quant.compare(model, qat, (x,))
    names = [d.name for d in report]
    assert names[:2] == ["quant", "backbone.0.0"] and names[-1] == "head.2"
    assert not any(d.module_a == "Identity" for d in report)
    assert "backbone.0" not in names and "backbone" not in names  # containers repeat their last layer: left out
    fused = next(d for d in report if d.name == "backbone.0.0")
    assert (fused.module_a, fused.module_b) == ("FusedLayer", "QATConv2d")
    assert all(20 < d.sqnr_db < math.inf and 0.99 < d.cosine <= 1.0 for d in report)
    assert report[0].max_error_lsb <= 0.5 + 1e-9  # the input, in range: only rounding, at most half a step
    assert "SQNR dB" in str(report).splitlines()[0] and len(str(report).splitlines()) == len(report) + 1


def test_compare_finds_the_layer_that_breaks():
    model, qat, x = _models()
    with torch.no_grad():
        qat.backbone[1][0].layer.weight.mul_(-1)  # break one layer
    report = quant.compare(model, qat, (x,))
    first_bad = next(d.name for d in report if d.sqnr_db < 0)
    assert first_bad == "backbone.1.0" and report.worst(1)[0].sqnr_db < 0
    assert {d.name: d.sqnr_db for d in report}["backbone.0.0"] > 20  # layers before it are unaffected


def test_compare_sees_float_functional_adds():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, cifar_stem=True).eval()
    qat = quant.prepare_qat(model, {"": quant.get_default_qat_qconfig(), "module_name": [("loss", None)]})
    x = torch.randn(2, 3, 32, 32)
    quant.set_fake_quant_state(qat, "calibration")
    qat.eval()(x)
    quant.set_fake_quant_state(qat, "validation")
    rows = {d.name: d for d in quant.compare(model, qat, (x,))}
    assert (rows["backbone.1.add"].module_a, rows["backbone.1.add"].module_b) == ("FloatFunctional", "QATFloatFunctional")



def test_several_batches_give_one_number_per_layer_over_all_of_them():
    from hat.quant.compare import diff_layers, prepare_for_compare, record

    model, qat, x = _models()
    a, b = prepare_for_compare(model), prepare_for_compare(qat)
    halves = diff_layers([(record(a, (part,)), record(b, (part,))) for part in x.split(8)])
    whole = quant.compare(model, qat, (x,))
    assert [d.name for d in halves] == [d.name for d in whole]
    for h, w in zip(halves, whole):
        assert math.isclose(h.sqnr_db, w.sqnr_db, rel_tol=1e-9) and math.isclose(h.cosine, w.cosine, rel_tol=1e-9)
        assert math.isclose(h.max_error_lsb, w.max_error_lsb, rel_tol=1e-9)


def test_an_fx_block_compares_every_layer_with_inplace_relu_and_unfused_bn():
    """A torchvision-style block: conv2 + bn2 (no activation) is a container in the float model, and the in-place
    ReLU after the residual add returns its input; both still get a row, and the add is its value before the ReLU."""
    from torch import nn

    from hat.quant.fx import quant_friendly

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)

    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    block = Block().eval()
    float_model = quant_friendly(block, (x,))  # what a torchvision float model is in the zoo
    qat = quant.prepare_qat_fx(block, example_inputs=(x,))
    quant.set_fake_quant_state(qat, "calibration")
    qat.eval()(x)
    quant.set_fake_quant_state(qat, "validation")
    rows = {d.name: d for d in quant.compare(float_model, qat, (x,))}
    assert {"conv1", "conv2", "relu", "add_float_functional"} <= set(rows)
    assert (rows["conv2"].module_a, rows["conv2"].module_b) == ("FusedLayer", "QATConv2d")
    assert all(d.sqnr_db > 20 for d in rows.values())
    add, relu = rows["add_float_functional"], rows["relu"]
    assert add.sqnr_db != relu.sqnr_db  # the ReLU changed the add's tensor in place after it was recorded
