"""torchvision architectures as zoo models: `model: {type: torchvision, arch: resnet18, num_classes: 10}`.

The network is torchvision's definition, made quant-friendly once by graph rewriting (hat.quant.fx.quant_friendly:
conv + bn groups, tensor additions through FloatFunctional), so every stage (float, calibration, QAT, int_infer)
and the zoo treat it like a hat model. No weights download: start from a checkpoint or the local zoo.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from hat.models.classifier import Classifier
from hat.quant.fx import quant_friendly
from hat.registry import register


@register(kind="model")
def torchvision(arch: str = "resnet18", num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                arch_args: Optional[dict] = None) -> Classifier:
    """`arch`: a name of torchvision.models.list_models() (built by its builder) or a model class of
    torchvision.models (VisionTransformer, SwinTransformer, ...); `arch_args`: keyword arguments for it (a small ViT:
    {image_size: 32, patch_size: 4, num_layers: 4, num_heads: 4, hidden_dim: 64, mlp_dim: 128}). `image_size` is
    the input's side (the graph is traced at that size, and the first conv takes `in_channels`)."""
    import torchvision as tv

    names = tv.models.list_models(module=tv.models)
    classes = [name for name in dir(tv.models) if isinstance(getattr(tv.models, name), type)
               and issubclass(getattr(tv.models, name), nn.Module)]
    arch_args = dict(arch_args or {})
    if arch in names:
        net = tv.models.get_model(arch, weights=None, num_classes=num_classes, **arch_args)
    elif arch in classes:
        net = getattr(tv.models, arch)(num_classes=num_classes, **arch_args)
    else:
        close = [name for name in names + classes if name.lower().startswith(arch[:3].lower())][:5]
        raise ValueError(f"'{arch}' is neither a torchvision classification model nor a model class of "
                         f"torchvision.models (e.g. {', '.join(close) or 'resnet18, VisionTransformer'})")
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
