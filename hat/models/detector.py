"""Dense-prediction structures: backbone + neck + head, the deploy part, with losses and post-processing outside it.

`model(images)` returns the deploy outputs (a dict of named float tensors for a detector, the logits map for a
segmentor); `model(images, targets)` returns (loss dict, outputs); `model.postprocess(outputs)` turns outputs —
the model's, or the integer program's — into predictions (boxes after NMS, per-pixel classes). Only
`deploy_model()` becomes the integer program.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hat.quant.stubs import DeQuantStub, QuantStub
from hat.registry import register


class _Deploy(nn.Module):
    """quant -> backbone -> neck -> head -> dequant (each output): the part that runs on the device."""

    def __init__(self, quant: nn.Module, backbone: nn.Module, neck: nn.Module, head: nn.Module, dequant: nn.Module):
        super().__init__()
        self.quant, self.backbone, self.neck, self.head, self.dequant = quant, backbone, neck, head, dequant

    def forward(self, images: torch.Tensor):
        outputs = self.head(self.neck(self.backbone(self.quant(images))))
        if isinstance(outputs, dict):
            return {name: self.dequant(value) for name, value in outputs.items()}
        return self.dequant(outputs)


@register(kind="structure")
class Detector(nn.Module):
    """backbone (multi-scale features) + neck (e.g. FPN) + head (e.g. FCOSHead, with `loss` and `postprocess`)."""

    def __init__(self, backbone: nn.Module, neck: nn.Module, head: nn.Module):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.backbone, self.neck, self.head = backbone, neck, head

    def forward(self, images: torch.Tensor, targets: Any = None):
        outputs = _Deploy(self.quant, self.backbone, self.neck, self.head, self.dequant)(images)
        if targets is None:
            return outputs
        return self.head.loss(outputs, targets), outputs

    def postprocess(self, outputs: Any) -> Any:
        """Predictions from deploy outputs (the model's or the integer program's): the head's post-processing."""
        return self.head.postprocess(outputs)

    def deploy_model(self) -> nn.Module:
        """The part that runs on the device (shares parameters with this model): image -> dict of raw outputs."""
        return _Deploy(self.quant, self.backbone, self.neck, self.head, self.dequant)


@register(kind="structure")
class Segmentor(Detector):
    """backbone + decoder neck (e.g. UNetDecoder) + head (SegHead): `model(images)` is the logits map."""
