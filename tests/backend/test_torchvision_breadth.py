"""Every torchvision classification model through the integer pipeline (backend.try_pipeline): prepare_qat_fx ->
calibration -> a QAT step -> convert -> check -> compile -> a program bit-exact with the quantized model (batch 4
and 1, after a .hir save/load). Random init, 64x64 inputs (what the architecture needs where it needs more).

A handful of small ones run in the default suite; the rest are marked slow (`make test-all`)."""
import pytest
import torch
import torchvision

from hat import backend
from hat.backend.trial import STAGES

ALL = torchvision.models.list_models(module=torchvision.models)
SIZES = {"inception_v3": 299, "googlenet": 224, "maxvit_t": 224}  # stems and windows that need more than 64
FAST = ("mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_0", "mnasnet0_5", "regnet_x_400mf")
SKIPPED = {  # name: why it is not run here (each architecture's ops run through a smaller sibling)
    "vit_h_14": "632 M parameters, too big for the test machine; vit_b_16 runs the same blocks",
    "vit_l_16": "304 M parameters, too big for the test machine; vit_b_16 runs the same blocks",
    "vit_l_32": "306 M parameters, too big for the test machine; vit_b_32 runs the same blocks",
    "regnet_y_128gf": "645 M parameters, too big for the test machine; regnet_y_32gf runs the same blocks",
}
NOT_YET: dict[str, str] = {}  # name: what is missing (strict xfail: passing makes the test say so)


def _params(name: str):
    marks = [] if name in FAST else [pytest.mark.slow]
    if name in SKIPPED:
        marks.append(pytest.mark.skip(reason=SKIPPED[name]))
    if name in NOT_YET:
        marks.append(pytest.mark.xfail(reason=NOT_YET[name], strict=True))
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", [_params(name) for name in ALL])
def test_every_torchvision_model_reaches_a_bit_exact_program(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    size = SIZES.get(name, 224 if name.startswith("vit_") else 64)
    trial = backend.try_pipeline(model, [torch.randn(4 if size <= 64 else 2, 3, size, size) for _ in range(3)])
    if trial.exception is not None:
        raise trial.exception
    assert trial.passed and trial.bit_exact


def test_the_skip_lists_name_real_models():
    assert set(FAST) | set(SKIPPED) | set(NOT_YET) <= set(ALL)
    issue_16 = {"alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
                "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                "regnet_x_400mf", "regnet_y_400mf", "resnet18", "resnet50", "resnext50_32x4d", "shufflenet_v2_x0_5",
                "squeezenet1_0", "swin_t", "swin_v2_t", "vgg11_bn", "wide_resnet50_2", "vit_b_32"}
    assert len(issue_16) == 24
    assert not issue_16 & set(SKIPPED) and not issue_16 & set(NOT_YET)


def test_a_failing_stage_is_reported_with_its_error():
    class FloatOnly(torch.nn.Module):
        def forward(self, x):
            return torch.fft.fft2(x).real.flatten(1)

    trial = backend.try_pipeline(FloatOnly().eval(), [torch.randn(2, 1, 4, 4) for _ in range(2)])
    assert not trial.passed and trial.stage in STAGES[:STAGES.index("check")]
    assert trial.error and trial.exception is not None
