"""Each question of the seed FAQ (sections 2.3 and 2.4) that concerns the quantization API: the case either
works here or ends in a message that says what to change. The FAQ number is in each test's name."""
import copy

import pytest
import torch
from torch import nn

from hat import quant
from hat.engine import Trainer
from hat.errors import UsageError
from hat.models import create_model
from hat.quant import QuantizationError
from hat.quant.qat import QATFloatFunctional


def _qat(model, **qconfig_dict):
    return quant.prepare_qat(model, {"": quant.get_default_qat_qconfig(), **qconfig_dict})


def test_faq_2_3_q2_qconfig_choices_outside_the_march_are_refused():
    with pytest.raises(ValueError, match="activation_dtype must be one of qint8, qint16 on march 'bayes'"):
        quant.get_default_qat_qconfig(activation_dtype="qint4")
    with pytest.raises(ValueError, match="algorithm must be one of fake_quant, lsq, pact"):
        quant.get_default_qat_qconfig(algorithm="adaround")


class NaNAfter(torch.utils.data.Dataset):
    """Digits-like data whose sample `bad` is NaN."""

    def __init__(self, bad):
        self.images, self.bad = torch.randn(64, 1, 8, 8), bad

    def __len__(self):
        return 64

    def __getitem__(self, i):
        image = self.images[i].clone()
        if i == self.bad:
            image[0, 0, 0] = float("nan")
        return image, i % 10


def _nan_trainer(digits_cfg, mode, lr=0.01, bad=-1):
    from omegaconf import OmegaConf

    from hat.data import build_loader

    torch.manual_seed(0)
    model = create_model("convnet_small")
    loader = build_loader(NaNAfter(bad), OmegaConf.merge(digits_cfg().data, {"batch_size": 16}), train=False, seed=0)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=lr), loader, epochs=2, on_nonfinite=mode)


def test_faq_2_3_q4_nan_input_stops_with_the_likely_causes_in_order(digits_cfg):
    from hat.engine.nonfinite import NonFiniteError

    with pytest.raises(NonFiniteError) as err:
        _nan_trainer(digits_cfg, "stop", bad=20).fit()
    message = str(err.value)
    assert message.startswith("non-finite input batch (NaN/Inf in the data) at epoch 1, step 2")
    order = [message.index(cause) for cause in ("input data holds NaN", "float model had not converged",
                                                  "calibration was skipped", "learning rate is too high",
                                                  "OneCycle or an adaptive optimizer")]
    assert order == sorted(order) and "trainer.clip_grad_norm" in message


def test_faq_2_3_q4_skip_mode_drops_bad_steps_and_keeps_weights_finite(digits_cfg):
    from hat.engine.nonfinite import non_finite_weights

    trainer = _nan_trainer(digits_cfg, "skip", bad=20)
    trainer.fit()
    assert trainer.skipped_steps == 2 and trainer.step == 6  # one bad batch per epoch, 4 batches per epoch
    assert non_finite_weights(trainer.model) == []


def test_faq_2_3_q4_a_diverging_learning_rate_is_caught(digits_cfg):
    from hat.engine.nonfinite import NonFiniteError

    with pytest.raises(NonFiniteError, match="non-finite (loss|gradient) at epoch"):
        _nan_trainer(digits_cfg, "stop", lr=1e30).fit()


def test_faq_2_3_q4_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    from hat.engine.callbacks import CheckpointCallback
    from hat.engine.nonfinite import NonFiniteError

    model = create_model("convnet_small")
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), train_loader=None, epochs=1)
    callback = CheckpointCallback(tmp_path, "config: 1")
    callback.after_epoch(trainer)
    before = (tmp_path / "last.pt").read_bytes()
    with torch.no_grad():
        model.head[2].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"refusing to write a checkpoint: non-finite values in head\.2\.weight"):
        callback.after_epoch(trainer)
    assert (tmp_path / "last.pt").read_bytes() == before


def test_faq_2_3_q4_the_refusal_says_so_when_no_checkpoint_exists_yet(tmp_path):
    from hat.engine.callbacks import CheckpointCallback
    from hat.engine.nonfinite import NonFiniteError

    model = create_model("convnet_small")
    with torch.no_grad():
        model.head[2].weight[0, 0] = float("nan")
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), train_loader=None, epochs=1)
    with pytest.raises(NonFiniteError, match=r"no checkpoint of this run exists yet \(the weights broke before its "
                                             r"first epoch ended\)") as err:
        CheckpointCallback(tmp_path, "config: 1").after_epoch(trainer)
    assert "keeps the previous epoch" not in str(err.value) and not list(tmp_path.iterdir())


def test_faq_2_3_q5_module_name_given_as_an_index_is_an_error_naming_real_modules():
    qc16 = quant.get_default_qat_qconfig(activation_dtype="qint16")
    with pytest.raises(ValueError, match=r"module_name must be the module's dotted name as a string .* got int 2; "
                                         r"modules named like it: backbone\.2, head\.2, backbone\.0\.2"):
        quant.prepare_qat(create_model("convnet_small"), {"": qc16, "module_name": [(2, qc16)]})


def test_faq_2_3_q6_printed_qat_model_and_report_show_high_precision_layers():
    qat = _qat(create_model("convnet_small"), module_name=[("head.2", quant.get_default_qat_out_qconfig())])
    assert "activation_post_process" not in dict(qat.head[2].named_children())
    assert isinstance(qat.backbone[0][0].activation_post_process, quant.FakeQuantize)
    assert "(activation_post_process): FakeQuantize(" in repr(qat.backbone[0][0])
    report = quant.qconfig_report(create_model("convnet_small"), {
        "": quant.get_default_qat_qconfig(),
        "module_name": [("backbone.2.0", quant.get_default_qat_qconfig(activation_dtype="qint16")),
                        ("head.2", quant.get_default_qat_out_qconfig())]})
    rows = {line.split()[0]: line.split()[2:] for line in report.splitlines()[1:]}
    assert rows["backbone.2.0"] == ["qint16", "qint8"]
    assert rows["head.2"] == ["qint32", "(high", "precision)", "qint8"]
    assert rows["backbone.0.2"] == ["qint8", "-"]  # ReLU: no weight


def test_faq_2_3_q7_auxiliary_branches_and_losses_stay_float():
    from hat.engine.quant_stages import qconfig_dict_from_config
    from tests.conftest import DIGITS
    from hat.config import load_config

    model = create_model("convnet_small")
    model.aux_heads.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)))
    qat = quant.prepare_qat(model, qconfig_dict_from_config(load_config(DIGITS), model))
    assert isinstance(qat.aux_heads[0][2], nn.Linear) and isinstance(qat.loss, nn.CrossEntropyLoss)
    qat.train()
    loss, _ = qat(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert qat.aux_heads[0][2].weight.grad is not None


def test_faq_2_3_q9_an_optimizer_built_before_prepare_is_an_error():
    model = create_model("convnet_small")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    qat = _qat(model)
    with pytest.raises(UsageError, match="the optimizer holds none of the model's trainable parameters.*built "
                                         "before prepare_qat"):
        Trainer(qat, optimizer, train_loader=None, epochs=1)


class Constants(nn.Module):
    """The FAQ's model shapes: float constants, -x, 1 - x and x[0] on quantized activations."""

    def __init__(self, expression):
        super().__init__()
        self.quant, self.dequant = quant.QuantStub(), quant.DeQuantStub()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.expression = expression

    def forward(self, x):
        return self.dequant(self.expression(self.conv(self.quant(x))))


@pytest.mark.parametrize("faq,expression", [
    ("2_3_q10_float_constant", lambda x: x + 1e-4),
    ("2_4_q11_index", lambda x: x[0]),
    ("2_4_q12_neg", lambda x: -x),
    ("2_4_q13_rsub", lambda x: 1 - x),
], ids=lambda v: v if isinstance(v, str) else "")
def test_faq_python_expressions_on_quantized_activations_work_in_eager_qat(faq, expression):
    torch.manual_seed(0)
    model = Constants(expression)
    x = torch.randn(2, 1, 6, 6)
    qat = _qat(model)
    qat.train()
    out = qat(x)
    out.sum().backward()
    assert qat.conv.layer.weight.grad is not None
    expected = expression(model.conv(x))
    assert out.shape == expected.shape
    step = qat.conv.activation_post_process.scale.item()
    inside = expected.abs() <= 127 * step  # x + c keeps x's scale, so it saturates at x's range, like the device
    assert inside.float().mean() > 0.6
    assert (out - expected)[inside].abs().max() <= 1.5 * step  # within quantization error of the float result
    assert set(torch.round(out[~inside] / step).abs().tolist()) <= {127.0, 128.0}  # saturated at the range's ends


class PlainArithmetic(nn.Module):
    """A plain torch model (no stubs, no FloatFunctional) with the FAQ's expressions."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        a, b = self.conv1(x), self.conv2(x)
        y = a + b  # tensor + tensor: rewritten into a FloatFunctional
        y = torch.cat([y, a * b], dim=1)  # rewritten too
        return (1 - y)[0:1] + 1e-4, -y[0]  # 1 - x, + c: add_scalar (observed scale); slicing, -x, x[0]: QTensor


def test_faq_2_3_q10_and_2_4_q11_to_q13_graph_mode_takes_plain_arithmetic():
    torch.manual_seed(0)
    model, x = PlainArithmetic(), torch.randn(2, 1, 6, 6)
    qat = quant.prepare_qat_fx(model, example_inputs=(x,))
    assert sum(isinstance(m, QATFloatFunctional) for m in qat.modules()) == 5
    out, neg = qat(x)
    (out.sum() + neg.sum()).backward()
    expected, expected_neg = model(x)
    assert out.shape == expected.shape and neg.shape == expected_neg.shape
    assert torch.corrcoef(torch.stack([out.flatten(), expected.flatten()]))[0, 1] > 0.99
    assert (out - expected).abs().max() < 0.05 * expected.abs().max()  # 1 - y is not clipped to y's range


class FaqWeights(nn.Module):
    """FAQ 2.3 Q10's model before its manual fix: a learnable weight vector and a float epsilon in forward."""

    def __init__(self):
        super().__init__()
        self.p5_w1 = nn.Parameter(torch.ones(2))
        self.epsilon = nn.Buffer(torch.tensor([1e-4]))
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        w = torch.relu(self.p5_w1)
        return self.conv(x) * (w.sum() + self.epsilon)


def test_faq_2_3_q10_model_tensors_in_arithmetic_get_their_own_quant_stub():
    torch.manual_seed(0)
    model, x = FaqWeights(), torch.randn(2, 2, 4, 4)
    qat = quant.prepare_qat_fx(model, example_inputs=(x,))
    children = {name for name, _ in qat.named_children()}  # w.sum() + epsilon: float, one stub where it meets x
    assert "quant_add" in children and not {"quant_sum_1", "quant_epsilon", "add_float_functional"} & children
    quant.set_fake_quant_state(qat, "calibration")
    qat(x)
    quant.set_fake_quant_state(qat, "qat")
    out = qat(x)
    out.sum().backward()
    assert qat.p5_w1.grad is not None  # the weight still learns through its fake quant
    assert torch.corrcoef(torch.stack([out.flatten(), model(x).flatten()]))[0, 1] > 0.99


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value
            return self.conv(x)
        return x


def test_faq_2_4_q10_control_flow_names_the_file_and_line_of_the_forward():
    line = DataDependent.forward.__code__.co_firstlineno + 1
    with pytest.raises(QuantizationError, match=rf"cannot trace DataDependent: .*test_faq\.py:{line} in forward "
                                                r"uses a tensor value in Python control flow"):
        quant.prepare_qat_fx(DataDependent(), example_inputs=(torch.randn(1, 1, 2, 2),))


def test_faq_2_4_q3_non_leaf_tensors_do_not_break_prepare():
    model = create_model("convnet_small")
    model.cached = model.head[2].weight * 2  # a non-leaf tensor held by the model
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)
    qat = quant.prepare_qat(model)  # inplace=False works
    assert qat is not model and not qat.cached.requires_grad


def test_faq_2_4_q4_a_subclassed_conv_with_its_own_forward_is_refused_with_the_fix():
    class Conv1d(nn.Conv2d):
        def forward(self, x):
            return torch.squeeze(super().forward(torch.unsqueeze(x, -2)), -2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.conv = quant.QuantStub(), Conv1d(2, 2, (1, 3))

    with pytest.raises(QuantizationError, match=r"module 'conv' \(Conv1d\) subclasses nn\.Conv2d and overrides "
                                                r"forward.*Hold the layer as a submodule"):
        quant.prepare_qat(Net())


def test_faq_2_4_q9_a_high_precision_output_feeding_another_op_names_the_module():
    qat = _qat(create_model("convnet_small"), module_name=[("backbone.2.0", quant.get_default_qat_out_qconfig())])
    with pytest.raises(QuantizationError, match=r"module 'backbone\.2\.0' has a high-precision \(qint32\) output, "
                                                r"but an op uses it.*Give 'backbone\.2\.0' an int8/int16 qconfig"):
        qat(torch.randn(2, 1, 8, 8))
