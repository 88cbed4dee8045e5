import pytest
import torch

from hat.models import Classifier, create_model, list_models
from hat.registry import build
from tests.conftest import zoo_model


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_builds_trains_and_deploys(name):
    model, shape = zoo_model(name)
    x = torch.randn(2, *shape)
    target = torch.tensor([0, 6])
    loss, logits = model(x, target)
    assert logits.shape == (2, 7) and loss.ndim == 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert torch.equal(model(x), model.deploy_model()(x))


def test_list_models_pattern():
    assert list_models("resnet*") == ["resnet18", "resnet34"]


def test_resnet18_imagenet_stem_matches_torchvision_parameter_count():
    import torchvision

    ours = sum(p.numel() for p in create_model("resnet18").parameters())
    theirs = sum(p.numel() for p in torchvision.models.resnet18().parameters())
    assert ours == theirs


def test_mobilenet_v2_matches_torchvision_parameter_count():
    import torchvision

    ours = sum(p.numel() for p in create_model("mobilenet_v2").parameters())
    assert ours == sum(p.numel() for p in torchvision.models.mobilenet_v2().parameters())


def test_classifier_from_parts_excludes_loss_and_aux_heads_from_deploy():
    model = build({"type": "Classifier", "backbone": {"type": "ConvNet", "in_channels": 1},
                   "head": {"type": "ClsHead", "in_channels": 64, "num_classes": 10},
                   "aux_heads": [{"type": "ClsHead", "in_channels": 64, "num_classes": 10}],
                   "loss": {"type": "CrossEntropyLoss", "label_smoothing": 0.1}})
    assert isinstance(model, Classifier)
    deploy_names = {n for n, _ in model.deploy_model().named_modules()}
    assert not any("aux" in n or "loss" in n for n in deploy_names)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    with_aux, _ = model(x, y)
    model.eval()
    without_aux, _ = model(x, y)
    assert with_aux > without_aux  # the auxiliary loss only counts in training


def test_torchvision_definitions_are_zoo_models():
    """model: {type: torchvision, arch: ...}: torchvision's network (the parametrized tests above and in
    tests/backend quantize and compile it), with the first conv taking `in_channels`."""
    model = create_model("torchvision", arch="resnet18", num_classes=10, in_channels=1, image_size=16)
    assert sum(p.numel() for p in model.parameters()) == 11_175_370  # torchvision's resnet18, 1-channel stem
    with pytest.raises(ValueError, match="'resnet81' is neither a torchvision classification model nor a model "
                                         "class of torchvision.models"):
        create_model("torchvision", arch="resnet81")


def test_a_torchvision_model_class_with_its_arguments_is_a_zoo_model():
    """arch: VisionTransformer + arch_args: a small ViT (what projects/fashion_mnist/vit_small.yaml trains)."""
    import torchvision

    args = dict(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    model = create_model("torchvision", arch="VisionTransformer", arch_args=args, num_classes=10, in_channels=1,
                         image_size=16)
    theirs = torchvision.models.VisionTransformer(num_classes=10, **args)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in theirs.parameters()) - 2 * 16 * 16
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)  # (the 1-channel patch conv: 2 x 16 x 4 x 4 fewer)
