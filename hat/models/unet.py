"""A UNet-style segmentation decoder and head: nearest upsampling, skip connections concatenated (FloatFunctional:
the two inputs have their own scales), conv-bn-relu; quant-friendly throughout."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hat.models.layers import ConvBNAct
from hat.quant.stubs import FloatFunctional
from hat.registry import register


@register(kind="neck")
class UNetDecoder(nn.Module):
    """Features [finest, ..., coarsest] -> one feature map at the finest resolution with `out_channels`.

    Each step upsamples the running map x2 (nearest) to the next finer feature, concatenates them and mixes with
    two 3x3 conv-bn-relu."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 16):
        super().__init__()
        chans = list(in_channels)
        self.cats = nn.ModuleList(FloatFunctional() for _ in chans[:-1])
        widths = [max(out_channels, c) for c in chans[:-1]]
        self.blocks = nn.ModuleList()
        running = chans[-1]
        for i in range(len(chans) - 2, -1, -1):
            self.blocks.append(nn.Sequential(ConvBNAct(running + chans[i], widths[i], 3),
                                             ConvBNAct(widths[i], widths[i] if i else out_channels, 3)))
            running = widths[i] if i else out_channels
        self.out_channels = out_channels if len(chans) > 1 else chans[0]

    def forward(self, features):
        if len(features) != len(self.cats) + 1:
            raise ValueError(f"UNetDecoder was built for {len(self.cats) + 1} features (in_channels), got "
                             f"{len(features)}")
        x = features[-1]
        for step, i in enumerate(range(len(features) - 2, -1, -1)):
            up = F.interpolate(x, size=features[i].shape[-2:], mode="nearest")
            x = self.blocks[step](self.cats[i].cat([up, features[i]], dim=1))
        return x


@register(kind="head")
class SegHead(nn.Module):
    """Per-pixel class logits: a 3x3 conv-bn-relu and a 1x1 conv to `num_classes` (background is class 0)."""

    def __init__(self, in_channels: int, num_classes: int, ignore_index: int = 255):
        super().__init__()
        self.conv = ConvBNAct(in_channels, in_channels, 3)
        self.out = nn.Conv2d(in_channels, num_classes, 1)
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def forward(self, x):
        return self.out(self.conv(x))

    def loss(self, logits: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-pixel cross entropy; logits coarser than the mask are bilinearly upsampled first."""
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
        return {"loss_seg": F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index)}

    @torch.no_grad()
    def postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """The class of every pixel [N, H, W] (at the logits' resolution)."""
        return logits.argmax(1)


