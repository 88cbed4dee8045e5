"""The classifier structure: backbone + head (the deploy part) + loss and auxiliary heads (training only)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import nn

from hat.quant.stubs import DeQuantStub, QuantStub
from hat.registry import register


@register(kind="head")
class ClsHead(nn.Sequential):
    """Global average pool -> flatten -> (dropout) -> linear."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0):
        layers = [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(in_channels, num_classes))
        super().__init__(*layers)


@register(kind="loss")
class CrossEntropyLoss(nn.CrossEntropyLoss):
    def __init__(self, label_smoothing: float = 0.0):
        super().__init__(label_smoothing=label_smoothing)


@register(kind="structure")
class Classifier(nn.Module):
    """`model(x)` returns logits (deploy path); `model(x, target)` returns (loss, logits) for training.

    Only `deploy_model()` (quant stub, backbone, head, dequant stub) goes on to quantization, export and the
    integer program: the loss and the auxiliary heads stay out of it by construction (`NON_DEPLOY`).
    """

    NON_DEPLOY = ("loss", "aux_heads")

    def __init__(self, backbone: nn.Module, head: nn.Module, loss: Optional[nn.Module] = None,
                 aux_heads: Optional[Sequence[nn.Module]] = None, aux_weight: float = 0.4):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.backbone, self.head = backbone, head
        self.loss = loss if loss is not None else CrossEntropyLoss()
        self.aux_heads = nn.ModuleList(aux_heads or [])
        self.aux_weight = aux_weight

    def forward(self, x: torch.Tensor, target: Optional[torch.Tensor] = None):
        features = self.backbone(self.quant(x))
        logits = self.dequant(self.head(features))
        if target is None:
            return logits
        loss = self.loss(logits, target)
        if self.training:
            for aux in self.aux_heads:
                loss = loss + self.aux_weight * self.loss(aux(self.dequant(features)), target)
        return loss, logits

    def deploy_model(self) -> nn.Sequential:
        """The part that runs on the device: shares parameters with this model, and its module names (`backbone.0`,
        `head.2`), so reports on the deploy part name layers as the config's `quant.*_modules` do."""
        return nn.Sequential(OrderedDict(quant=self.quant, backbone=self.backbone, head=self.head,
                                         dequant=self.dequant))
