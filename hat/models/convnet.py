"""A plain stack of conv-bn-relu blocks: the small quant-friendly model for digits and Fashion-MNIST."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from hat.models.classifier import Classifier, ClsHead
from hat.models.layers import ConvBNAct
from hat.registry import register


@register(kind="backbone")
class ConvNet(nn.Sequential):
    """One ConvBNAct per entry of `widths`, with the matching stride."""

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64), strides: Sequence[int] = (1, 2, 2)):
        if len(widths) != len(strides):
            raise ValueError(f"ConvNet: widths {list(widths)} and strides {list(strides)} must have the same length")
        chans = [in_channels, *widths]
        super().__init__(*(ConvBNAct(chans[i], chans[i + 1], 3, s) for i, s in enumerate(strides)))
        self.out_channels = chans[-1]


@register(kind="model")
def convnet_small(num_classes: int = 10, in_channels: int = 1) -> Classifier:
    """3 conv layers, 16-32-64 channels (~24k parameters): digits in seconds."""
    backbone = ConvNet(in_channels, (16, 32, 64), (1, 2, 2))
    return Classifier(backbone, ClsHead(backbone.out_channels, num_classes))


@register(kind="model")
def convnet_base(num_classes: int = 10, in_channels: int = 1) -> Classifier:
    """6 conv layers, 32-128 channels (~0.3M parameters): Fashion-MNIST at 28x28."""
    backbone = ConvNet(in_channels, (32, 32, 64, 64, 128, 128), (1, 1, 2, 1, 2, 1))
    return Classifier(backbone, ClsHead(backbone.out_channels, num_classes, dropout=0.1))
