"""ResNet-18/34 (basic blocks) with an optional CIFAR stem (3x3 stride-1 conv, no max pool) for small images."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hat.models.classifier import Classifier, ClsHead
from hat.models.layers import ConvBNAct
from hat.quant.stubs import FloatFunctional
from hat.registry import register


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, out_channels, 3, stride)
        self.conv2 = ConvBNAct(out_channels, out_channels, 3, 1, act=None)
        self.shortcut = (ConvBNAct(in_channels, out_channels, 1, stride, act=None)
                         if stride != 1 or in_channels != out_channels else nn.Identity())
        self.add = FloatFunctional()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.add.add(self.conv2(self.conv1(x)), self.shortcut(x)))


@register(kind="backbone")
class ResNet(nn.Sequential):
    def __init__(self, depths: Sequence[int] = (2, 2, 2, 2), in_channels: int = 3, cifar_stem: bool = False,
                 widths: Sequence[int] = (64, 128, 256, 512)):
        stem = ([ConvBNAct(in_channels, widths[0], 3, 1)] if cifar_stem else
                [ConvBNAct(in_channels, widths[0], 7, 2), nn.MaxPool2d(3, 2, 1)])
        blocks, chans = [], widths[0]
        for stage, (depth, width) in enumerate(zip(depths, widths)):
            for i in range(depth):
                blocks.append(BasicBlock(chans, width, 2 if stage > 0 and i == 0 else 1))
                chans = width
        super().__init__(*stem, *blocks)
        self.out_channels = chans


def _resnet(depths: Sequence[int], num_classes: int, in_channels: int, cifar_stem: bool) -> Classifier:
    backbone = ResNet(depths, in_channels, cifar_stem)
    return Classifier(backbone, ClsHead(backbone.out_channels, num_classes))


@register(kind="model")
def resnet18(num_classes: int = 1000, in_channels: int = 3, cifar_stem: bool = False) -> Classifier:
    return _resnet((2, 2, 2, 2), num_classes, in_channels, cifar_stem)


@register(kind="model")
def resnet34(num_classes: int = 1000, in_channels: int = 3, cifar_stem: bool = False) -> Classifier:
    return _resnet((3, 4, 6, 3), num_classes, in_channels, cifar_stem)
