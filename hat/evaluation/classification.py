"""Top-1 (and top-k) accuracy of classification logits, in percent."""
from __future__ import annotations

import torch

from hat.evaluation.base import Evaluator, sum_over_ranks
from hat.registry import register


@register(kind="evaluator")
class Accuracy(Evaluator):
    """Percent of images whose label is the best logit ("val/top1") and, for topk > 1, among the best k."""

    main_metric = "val/top1"

    def __init__(self, topk: int = 1):
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"Accuracy: topk must be an integer >= 1 (e.g. 1 or 5), got {topk!r}")
        self.topk = topk
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(4, dtype=torch.int64)  # top-1 hits, top-k hits, images, batches with K < topk

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        """Logits [B, K] and int labels [B]."""
        logits, labels = predictions.detach().cpu(), targets.detach().cpu()
        if logits.dim() != 2 or labels.dim() != 1 or len(logits) != len(labels):
            raise ValueError(f"Accuracy: expected logits [B, K] and labels [B], got {tuple(logits.shape)} and "
                             f"{tuple(labels.shape)}; a classification model's output and the dataset's labels")
        k = min(self.topk, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        self.counts += torch.tensor([int(hits[:, 0].sum()), int(hits.any(1).sum()), len(labels), k < self.topk])

    def compute(self) -> dict[str, float]:
        top1, topk, count, too_few_classes = sum_over_ranks(self.counts).tolist()
        metrics = {"val/top1": 100.0 * top1 / max(1, count)}
        if self.topk > 1 and not too_few_classes:  # top-k of fewer than k classes is always 100: not reported
            metrics[f"val/top{self.topk}"] = 100.0 * topk / max(1, count)
        return metrics
