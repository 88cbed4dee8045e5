"""A feature pyramid neck (FPN): lateral 1x1 convs, top-down nearest upsampling and additions, 3x3 output convs.

Quant-friendly: every addition is a FloatFunctional (it needs a scale of its own), upsampling is nearest (an
integer op that keeps the grid), no GroupNorm."""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import nn

from hat.models.layers import ConvBNAct
from hat.quant.stubs import FloatFunctional
from hat.registry import register


@register(kind="neck")
class FPN(nn.Module):
    """Features [finest, ..., coarsest] (channels `in_channels`) -> as many features of `out_channels` each."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 32):
        super().__init__()
        self.lateral = nn.ModuleList(ConvBNAct(c, out_channels, 1, act=None) for c in in_channels)
        self.adds = nn.ModuleList(FloatFunctional() for _ in in_channels[:-1])
        self.output = nn.ModuleList(ConvBNAct(out_channels, out_channels, 3) for _ in in_channels)
        self.out_channels = out_channels

    def forward(self, features):
        if len(features) != len(self.lateral):
            raise ValueError(f"FPN was built for {len(self.lateral)} features (in_channels), got {len(features)}")
        laterals = [lateral(f) for lateral, f in zip(self.lateral, features)]
        merged = [laterals[-1]]
        for i in range(len(laterals) - 2, -1, -1):  # top-down: coarse to fine
            up = F.interpolate(merged[0], size=laterals[i].shape[-2:], mode="nearest")
            merged.insert(0, self.adds[i].add(laterals[i], up))
        return [conv(m) for conv, m in zip(self.output, merged)]
