"""An FCOS-style anchor-free detection head: per-location class logits, box distances (l, t, r, b) and centerness
at every pyramid level, from output convs shared by the levels.

The conv towers before them are one per level: a tower shared by the levels would share its batch norms, whose
running statistics then average levels with different statistics, and the evaluated (and deployed) model would no
longer match the trained one (FCOS's GroupNorm avoids this but is not an integer op here).

The head's convs are the deploy part; the final convs are meant as int32 outputs (`quant.high_precision_outputs`).
Everything nonlinear after them — exp of the distances, sigmoids, decoding, NMS — runs in float in `postprocess`,
outside the integer program, on its dequantized outputs. Training: center-sampling targets (fcos_targets.py),
sigmoid focal loss, GIoU loss weighted by centerness, centerness BCE (torchvision.ops).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, generalized_box_iou_loss, sigmoid_focal_loss

from hat.models.fcos_targets import fcos_targets, level_points
from hat.models.layers import ConvBNAct
from hat.registry import register



def _tower(channels: int, depth: int) -> nn.Sequential:
    return nn.Sequential(*(ConvBNAct(channels, channels, 3) for _ in range(depth)))


@register(kind="head")
class FCOSHead(nn.Module):
    """Outputs named `cls_s{stride}` [N, classes, H, W], `box_s{stride}` [N, 4, H, W] (log of distance / stride)
    and `ctr_s{stride}` [N, 1, H, W] for each level, in that order."""

    def __init__(self, in_channels: int, num_classes: int, strides: Sequence[int], tower_depth: int = 2,
                 regress_ranges: Sequence[float] = (), center_radius: float = 1.5, score_threshold: float = 0.05,
                 nms_iou: float = 0.6, max_detections: int = 100, pre_nms_top_k: int = 1000):
        super().__init__()
        if regress_ranges and len(regress_ranges) != len(strides) - 1:
            raise ValueError(f"regress_ranges takes {len(strides) - 1} boundaries between the {len(strides)} levels "
                             f"(strides {list(strides)}), got {list(regress_ranges)}")
        self.num_classes, self.strides = num_classes, list(strides)
        bounds = list(regress_ranges) or [4.0 * s for s in strides[1:]]  # FCOS's 8x stride, for strides 2x finer
        self.ranges = list(zip([0.0, *bounds], [*bounds, math.inf]))
        self.center_radius, self.score_threshold, self.nms_iou = center_radius, score_threshold, nms_iou
        self.max_detections, self.pre_nms_top_k = max_detections, pre_nms_top_k
        self.cls_towers = nn.ModuleList(_tower(in_channels, tower_depth) for _ in strides)
        self.box_towers = nn.ModuleList(_tower(in_channels, tower_depth) for _ in strides)
        self.cls_out = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.box_out = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.ctr_out = nn.Conv2d(in_channels, 1, 3, padding=1)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - 0.01) / 0.01))  # a 1% prior: focal loss starts stable

    def forward(self, features) -> dict:
        if len(features) != len(self.strides):
            raise ValueError(f"FCOSHead was built for {len(self.strides)} levels (strides), got {len(features)}")
        outputs = {}
        for stride, feature, cls_tower, box_tower in zip(self.strides, features, self.cls_towers, self.box_towers):
            cls_feature, box_feature = cls_tower(feature), box_tower(feature)
            outputs[f"cls_s{stride}"] = self.cls_out(cls_feature)
            outputs[f"box_s{stride}"] = self.box_out(box_feature)
            outputs[f"ctr_s{stride}"] = self.ctr_out(box_feature)
        return outputs

    def _flatten(self, outputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All levels as [N, P, ...]: class logits, distances in pixels (>0), centerness logits, point xy and the
        point's stride."""
        cls, dist, ctr, points, strides = [], [], [], [], []
        for stride in self.strides:
            c = outputs[f"cls_s{stride}"]
            n, _, h, w = c.shape
            cls.append(c.permute(0, 2, 3, 1).reshape(n, h * w, -1))
            box = outputs[f"box_s{stride}"].permute(0, 2, 3, 1).reshape(n, h * w, 4)
            dist.append(torch.exp(box.clamp(max=10.0)) * stride)
            ctr.append(outputs[f"ctr_s{stride}"].permute(0, 2, 3, 1).reshape(n, h * w))
            points.append(level_points(h, w, stride, c.device))
            strides.append(torch.full((h * w,), float(stride), device=c.device))
        return (torch.cat(cls, 1), torch.cat(dist, 1), torch.cat(ctr, 1), torch.cat(points), torch.cat(strides))

    def loss(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """loss_cls (focal, per positive), loss_box (GIoU, centerness-weighted), loss_ctr (BCE)."""
        cls, dist, ctr, points, strides = self._flatten({k: v.float() for k, v in outputs.items()})
        labels, boxes, centerness = fcos_targets(points, strides, self.ranges, targets, self.center_radius)
        positive = labels >= 0
        num_pos = max(float(positive.sum()), 1.0)
        onehot = torch.zeros_like(cls)
        onehot[positive] = F.one_hot(labels[positive], self.num_classes).to(cls.dtype)
        loss_cls = sigmoid_focal_loss(cls, onehot, reduction="sum") / num_pos
        if not positive.any():
            zero = (dist.sum() + ctr.sum()) * 0.0  # keeps the graph: every parameter gets a (zero) gradient
            return {"loss_cls": loss_cls, "loss_box": zero, "loss_ctr": zero}
        xy = points.expand_as(dist[..., :2])[positive]
        predicted = torch.cat([xy - dist[positive][:, :2], xy + dist[positive][:, 2:]], 1)
        weight = centerness[positive]
        loss_box = (generalized_box_iou_loss(predicted, boxes[positive], reduction="none") * weight).sum()
        loss_box = loss_box / weight.sum().clamp(min=1e-6)
        loss_ctr = F.binary_cross_entropy_with_logits(ctr[positive], weight, reduction="sum") / num_pos
        return {"loss_cls": loss_cls, "loss_box": loss_box, "loss_ctr": loss_ctr}

    @torch.no_grad()
    def postprocess(self, outputs: dict) -> list[dict[str, torch.Tensor]]:
        """Per image {boxes (xyxy pixels), scores, labels}: score sqrt(class x centerness) above the threshold, the
        top pre_nms_top_k, class-wise NMS, at most max_detections."""
        cls, dist, ctr, points, _ = self._flatten({k: v.float() for k, v in outputs.items()})
        first = outputs[f"cls_s{self.strides[0]}"]
        height, width = first.shape[-2] * self.strides[0], first.shape[-1] * self.strides[0]
        scores_all = torch.sqrt(torch.sigmoid(cls) * torch.sigmoid(ctr).unsqueeze(-1))
        results = []
        for scores, distances in zip(scores_all, dist):
            flat = scores.flatten()
            keep = torch.nonzero(flat > self.score_threshold).squeeze(1)
            if len(keep) > self.pre_nms_top_k:
                keep = keep[flat[keep].topk(self.pre_nms_top_k).indices]
            point, label = keep // self.num_classes, keep % self.num_classes
            xy, d = points[point], distances[point]
            boxes = torch.cat([xy - d[:, :2], xy + d[:, 2:]], 1)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            kept = batched_nms(boxes, flat[keep], label, self.nms_iou)[: self.max_detections]
            results.append({"boxes": boxes[kept], "scores": flat[keep][kept], "labels": label[kept]})
        return results
