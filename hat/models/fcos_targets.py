"""FCOS training targets: which ground-truth box each feature-map point regresses, with center sampling."""
from __future__ import annotations

from typing import Sequence

import torch


def level_points(height: int, width: int, stride: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[H*W, 2] (x, y) image coordinates of a level's points: the centers of their stride x stride cells."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], 1).float() * stride + stride / 2


def fcos_targets(points: torch.Tensor, strides: torch.Tensor, ranges: Sequence[tuple[float, float]],
                 targets: list[dict], radius: float = 1.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For points [P, 2] of strides [P] and per-image targets {boxes xyxy, labels}: labels [N, P] (-1 background),
    the assigned boxes [N, P, 4] and centerness targets [N, P].

    A point is positive for a box when it lies inside the box and within `radius` strides of its center, and its
    largest distance to the box's sides falls in its level's range (`ranges`, one (low, high) per distinct stride,
    finest first); of several such boxes it takes the smallest."""
    levels = torch.unique(strides, sorted=True)
    low = torch.empty_like(strides)
    high = torch.empty_like(strides)
    for level, (lo, hi) in zip(levels, ranges):
        low[strides == level], high[strides == level] = lo, hi
    labels, boxes, centerness = [], [], []
    for target in targets:
        gt, gt_labels = target["boxes"].float().to(points.device), target["labels"].to(points.device)
        n_points = len(points)
        if len(gt) == 0:
            labels.append(torch.full((n_points,), -1, dtype=torch.long, device=points.device))
            boxes.append(torch.zeros(n_points, 4, device=points.device))
            centerness.append(torch.zeros(n_points, device=points.device))
            continue
        x, y = points[:, 0:1], points[:, 1:2]  # [P, 1] against [G] boxes
        ltrb = torch.stack([x - gt[:, 0], y - gt[:, 1], gt[:, 2] - x, gt[:, 3] - y], -1)  # [P, G, 4]
        center = (gt[:, :2] + gt[:, 2:]) / 2
        reach = strides[:, None] * radius
        near = ((x - center[:, 0]).abs() < reach) & ((y - center[:, 1]).abs() < reach)
        largest = ltrb.max(-1).values
        ok = (ltrb.min(-1).values > 0) & near & (largest >= low[:, None]) & (largest <= high[:, None])
        area = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[None].expand_as(largest)
        area = torch.where(ok, area, torch.full_like(area, float("inf")))
        smallest, index = area.min(1)
        positive = torch.isfinite(smallest)
        chosen = ltrb[torch.arange(n_points, device=points.device), index]
        lr, tb = chosen[:, 0::2], chosen[:, 1::2]
        ctr = torch.sqrt((lr.min(1).values / lr.max(1).values).clamp(min=0) *
                         (tb.min(1).values / tb.max(1).values).clamp(min=0))
        labels.append(torch.where(positive, gt_labels[index], torch.full_like(index, -1)))
        boxes.append(gt[index])
        centerness.append(torch.where(positive, ctr, torch.zeros_like(ctr)))
    return torch.stack(labels), torch.stack(boxes), torch.stack(centerness)
