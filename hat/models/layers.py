"""Quant-friendly building blocks: conv+bn+act as one Sequential, which prepare_qat fuses into one conv."""
from __future__ import annotations

from torch import nn


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> optional ReLU/ReLU6: the pattern a quantizer fuses into one conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, act: str | None = "relu"):
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups,
                            bias=False), nn.BatchNorm2d(out_channels)]
        if act is not None:
            layers.append({"relu": nn.ReLU, "relu6": nn.ReLU6}[act](inplace=True))
        super().__init__(*layers)

