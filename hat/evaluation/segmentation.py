"""Mean intersection-over-union and pixel accuracy of semantic segmentation, from a confusion matrix."""
from __future__ import annotations

import math

import torch

from hat.evaluation.base import Evaluator, sum_over_ranks
from hat.registry import register


@register(kind="evaluator")
class MeanIoU(Evaluator):
    """mIoU over the classes present in target or prediction ("val/mIoU", %) and pixel accuracy ("val/pixel_acc",
    %); target pixels equal to `ignore_index` count for neither."""

    main_metric = "val/mIoU"

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"MeanIoU: num_classes must be an integer >= 1 (the dataset's class count), "
                             f"got {num_classes!r}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)  # [target, prediction]

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:
        """Class ids [B, H, W] (or logits [B, C, H, W]) and target ids [B, H, W]."""
        pred, target = predictions.detach().cpu(), targets.detach().cpu().long()
        if pred.is_floating_point() and pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ValueError(f"MeanIoU: predictions {tuple(predictions.shape)} do not fit targets "
                             f"{tuple(targets.shape)}; give class ids [B, H, W] or logits [B, C, H, W] at the "
                             f"targets' size")
        keep = target != self.ignore_index
        pred, target = pred[keep].long(), target[keep]
        k = self.num_classes
        for name, ids in (("target", target), ("prediction", pred)):
            bad = ids[(ids < 0) | (ids >= k)]
            if len(bad):
                raise ValueError(f"MeanIoU: a {name} pixel has class {int(bad[0])}, outside 0..{k - 1} "
                                 f"(num_classes {k}, ignore_index {self.ignore_index}); set num_classes or "
                                 f"ignore_index to match the dataset")
        self.confusion += torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)

    def per_class_iou(self) -> list[float]:
        """IoU (%) of each class over all ranks (call on every rank); nan for a class in neither target nor
        prediction."""
        return self._ious(sum_over_ranks(self.confusion))

    def compute(self) -> dict[str, float]:
        confusion = sum_over_ranks(self.confusion)
        present = [iou for iou in self._ious(confusion) if not math.isnan(iou)]
        return {"val/mIoU": sum(present) / len(present) if present else 0.0,
                "val/pixel_acc": 100.0 * int(confusion.diag().sum()) / max(1, int(confusion.sum()))}

    @staticmethod
    def _ious(confusion: torch.Tensor) -> list[float]:
        confusion = confusion.double()
        hits = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - hits
        return torch.where(union > 0, 100.0 * hits / union.clamp(min=1), torch.nan).tolist()
