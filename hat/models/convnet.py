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


@register(kind="backbone")
class PyramidConvNet(nn.Module):
    """Stages of ConvBNAct (the first of each with the stage's stride, then `depth - 1` at stride 1); returns the
    features of the stages in `out_indices`, finest first, for a detection neck or a segmentation decoder."""

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (16, 32, 48, 64),
                 strides: Sequence[int] = (2, 2, 2, 2), depths: Sequence[int] = (2, 2, 2, 2),
                 out_indices: Sequence[int] = (1, 2, 3)):
        super().__init__()
        if not len(widths) == len(strides) == len(depths):
            raise ValueError(f"PyramidConvNet: widths {list(widths)}, strides {list(strides)} and depths "
                             f"{list(depths)} must have the same length")
        if not out_indices or any(not 0 <= i < len(widths) for i in out_indices) or list(out_indices) != sorted(
                set(out_indices)):
            raise ValueError(f"PyramidConvNet: out_indices {list(out_indices)} must be increasing stage indices "
                             f"below {len(widths)}")
        chans = [in_channels, *widths]
        self.stages = nn.ModuleList(
            nn.Sequential(ConvBNAct(chans[i], chans[i + 1], 3, s),
                          *(ConvBNAct(chans[i + 1], chans[i + 1], 3, 1) for _ in range(d - 1)))
            for i, (s, d) in enumerate(zip(strides, depths)))
        self.out_indices = list(out_indices)
        self.out_channels = [widths[i] for i in out_indices]
        total = [1]
        for s in strides:
            total.append(total[-1] * s)
        self.strides = [total[i + 1] for i in out_indices]  # of each returned feature, relative to the input

    def forward(self, x):
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                features.append(x)
        return features
