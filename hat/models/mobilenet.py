"""MobileNetV2 (inverted residuals, ReLU6) with a width multiplier and an optional CIFAR stem."""
from __future__ import annotations

import torch
from torch import nn

from hat.models.classifier import Classifier, ClsHead
from hat.models.layers import ConvBNAct
from hat.quant.stubs import FloatFunctional
from hat.registry import register

# expansion t, channels c, repeats n, stride s (the paper's table 2)
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1))


def _divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        layers = [ConvBNAct(in_channels, hidden, 1, act="relu6")] if expansion != 1 else []
        layers += [ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act="relu6"),
                   ConvBNAct(hidden, out_channels, 1, act=None)]
        self.body = nn.Sequential(*layers)
        self.add = FloatFunctional() if stride == 1 and in_channels == out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.add.add(x, y) if self.add is not None else y


@register(kind="backbone")
class MobileNetV2(nn.Sequential):
    def __init__(self, in_channels: int = 3, width_mult: float = 1.0, cifar_stem: bool = False):
        chans = _divisible(32 * width_mult)
        layers: list[nn.Module] = [ConvBNAct(in_channels, chans, 3, 1 if cifar_stem else 2, act="relu6")]
        for index, (t, c, n, s) in enumerate(_SETTINGS):
            out = _divisible(c * width_mult)
            stride = 1 if cifar_stem and index == 1 else s  # CIFAR: keep resolution one stage longer
            for i in range(n):
                layers.append(InvertedResidual(chans, out, stride if i == 0 else 1, t))
                chans = out
        last = _divisible(1280 * max(1.0, width_mult))
        layers.append(ConvBNAct(chans, last, 1, act="relu6"))
        super().__init__(*layers)
        self.out_channels = last


@register(kind="model")
def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                 cifar_stem: bool = False) -> Classifier:
    backbone = MobileNetV2(in_channels, width_mult, cifar_stem)
    return Classifier(backbone, ClsHead(backbone.out_channels, num_classes, dropout=0.2))
