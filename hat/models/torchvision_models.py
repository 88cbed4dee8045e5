"""torchvision architectures as zoo models: `model: {type: torchvision, arch: resnet18, num_classes: 10}`.

The network is torchvision's definition, made quant-friendly once by graph rewriting (hat.quant.fx.quant_friendly:
conv + bn groups, tensor additions through FloatFunctional), so every stage (float, calibration, QAT, int_infer)
and the zoo treat it like a hat model. No weights download: start from a checkpoint or the local zoo.
"""
from __future__ import annotations

import torch
from torch import nn

from hat.models.classifier import Classifier
from hat.quant.fx import quant_friendly
from hat.registry import register


@register(kind="model")
def torchvision(arch: str = "resnet18", num_classes: int = 10, in_channels: int = 3,
                image_size: int = 32) -> Classifier:
    """`arch`: any name of torchvision.models.list_models(); `image_size` is the input's side (the graph is traced
    at that size, and the first conv takes `in_channels`)."""
    import torchvision as tv

    if arch not in tv.models.list_models(module=tv.models):
        close = [name for name in tv.models.list_models(module=tv.models) if name.startswith(arch[:3])][:5]
        raise ValueError(f"'{arch}' is not a torchvision classification model (e.g. {', '.join(close) or 'resnet18'})")
    net = tv.models.get_model(arch, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _set_input_channels(net, in_channels)
    example = torch.zeros(2, in_channels, image_size, image_size)
    return Classifier(quant_friendly(net, (example,), stubs=False), nn.Identity())


def _set_input_channels(net: nn.Module, channels: int) -> None:
    """Replace the first conv by one taking `channels` input channels (same output channels, kernel, stride)."""
    for parent in net.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, name, nn.Conv2d(channels, child.out_channels, child.kernel_size, child.stride,
                                                child.padding, child.dilation, child.groups, child.bias is not None))
                return
