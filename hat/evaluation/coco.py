"""Detection mAP with pycocotools' COCOeval, the ground truth built from the targets seen (any dataset, any shard)."""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from hat.evaluation.base import Evaluator, gather_over_ranks
from hat.registry import register

REPEAT_HINT = ("the val loader repeats images (DistributedSampler pads shards to equal size): use a sampler that "
               "yields each image once (hat's ShardSampler), and call reset() before each validation pass")


@dataclass
class _Image:
    """One image's ground truth and detections, as plain Python lists (picklable for the cross-rank gather)."""

    image_id: int
    size: Optional[tuple[int, int]]  # (height, width), when the target carried "size"
    gt_boxes: list[list[float]]  # xyxy
    gt_labels: list[int]
    gt_areas: Optional[list[float]]
    boxes: list[list[float]]  # xyxy
    scores: list[float]
    labels: list[int]


@register(kind="evaluator")
class COCOEvaluator(Evaluator):
    """COCO box AP over IoU .5:.95 ("val/mAP", %) and at IoU .5 ("val/mAP50", %), at most `max_detections` per
    image; labels are contiguous 0..K-1 (COCO category id = label + 1)."""

    main_metric = "val/mAP"

    def __init__(self, iou_type: str = "bbox", max_detections: int = 100, num_classes: Optional[int] = None):
        if iou_type != "bbox":
            raise ValueError(f"COCOEvaluator: iou_type '{iou_type}' is not supported (predictions carry boxes, "
                             f"not masks or keypoints); use iou_type: bbox")
        if isinstance(max_detections, bool) or not isinstance(max_detections, int) or max_detections < 1:
            raise ValueError(f"COCOEvaluator: max_detections must be an integer >= 1 (COCO uses 100), "
                             f"got {max_detections!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"COCOEvaluator: num_classes must be an integer >= 1 or left out, got {num_classes!r}")
        self.iou_type, self.max_detections, self.num_classes = iou_type, max_detections, num_classes
        self.reset()

    def reset(self) -> None:
        self.images: list[_Image] = []
        self._seen: set[int] = set()

    def update(self, predictions: Sequence[Mapping[str, Any]], targets: Sequence[Mapping[str, Any]]) -> None:
        """One dict per image: predictions {boxes [M,4] xyxy, scores [M], labels [M]}, targets {boxes [N,4] xyxy,
        labels [N], image_id, optional area [N], optional size (h, w)}."""
        if len(predictions) != len(targets):
            raise ValueError(f"COCOEvaluator: {len(predictions)} predictions for {len(targets)} targets; give one "
                             f"prediction dict per image")
        for pred, target in zip(predictions, targets):
            image_id = int(_field(target, "image_id", "target"))
            if image_id in self._seen:
                raise ValueError(f"COCOEvaluator: image_id {image_id} was seen twice since reset(): {REPEAT_HINT}")
            self._seen.add(image_id)
            gt_boxes, gt_labels = _boxes(target, "target"), self._labels(target, "target")
            boxes, labels = _boxes(pred, "prediction"), self._labels(pred, "prediction")
            scores = _cpu(_field(pred, "scores", "prediction")).double().flatten().tolist()
            area = target.get("area")
            size = target.get("size")
            if len(gt_labels) != len(gt_boxes) or len(labels) != len(boxes) or len(scores) != len(boxes) or (
                    area is not None and len(area) != len(gt_boxes)):
                raise ValueError(f"COCOEvaluator: image {image_id}: boxes, labels, scores (and area) must have one "
                                 f"entry per box")
            self.images.append(_Image(
                image_id, tuple(int(v) for v in _cpu(size).flatten().tolist()) if size is not None else None,
                gt_boxes, gt_labels, _cpu(area).double().tolist() if area is not None else None,
                boxes, scores, labels))

    def compute(self) -> dict[str, float]:
        images = sorted(gather_over_ranks(self.images), key=lambda im: im.image_id)
        for a, b in zip(images, images[1:]):
            if a.image_id == b.image_id:
                raise ValueError(f"COCOEvaluator: image_id {a.image_id} was evaluated on two ranks: {REPEAT_HINT}")
        if not any(im.gt_boxes for im in images):
            raise ValueError(f"COCOEvaluator: the {len(images)} images seen hold no ground-truth boxes, so mAP is "
                             f"undefined; check that the val dataset's targets carry 'boxes' and 'labels'")
        detections = [{"image_id": im.image_id, "category_id": label + 1, "bbox": _xywh(box), "score": score}
                      for im in images for box, score, label in zip(im.boxes, im.scores, im.labels)]
        if not detections:  # pycocotools cannot load an empty result list
            return {"val/mAP": 0.0, "val/mAP50": 0.0}
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = self._ground_truth(images)
            gt.createIndex()
            coco_eval = COCOeval(gt, gt.loadRes(detections), self.iou_type)
            coco_eval.params.maxDets = [self.max_detections]  # summarize() would assume [1, 10, 100]: not called
            coco_eval.evaluate()
            coco_eval.accumulate()
        params = coco_eval.params
        precision = coco_eval.eval["precision"][:, :, :, params.areaRngLbl.index("all"), 0]  # [IoU, recall, class]
        return {"val/mAP": _mean_ap(precision), "val/mAP50": _mean_ap(precision[params.iouThrs == 0.5])}

    def _ground_truth(self, images: list[_Image]) -> dict:
        """A COCO-format dataset of `images`: annotation ids from 1 (pycocotools reads id 0 as unmatched)."""
        entries, annotations = [], []
        for im in images:
            entries.append({"id": im.image_id} if im.size is None else
                           {"id": im.image_id, "height": im.size[0], "width": im.size[1]})
            for i, (box, label) in enumerate(zip(im.gt_boxes, im.gt_labels)):
                xywh = _xywh(box)
                area = im.gt_areas[i] if im.gt_areas is not None else xywh[2] * xywh[3]
                annotations.append({"id": len(annotations) + 1, "image_id": im.image_id, "category_id": label + 1,
                                    "bbox": xywh, "area": area, "iscrowd": 0})
        labels = {label for im in images for label in (*im.gt_labels, *im.labels)}
        count = self.num_classes if self.num_classes is not None else max(labels) + 1
        categories = [{"id": c + 1, "name": str(c)} for c in range(count)]
        return {"images": entries, "annotations": annotations, "categories": categories}

    def _labels(self, item: Mapping[str, Any], what: str) -> list[int]:
        labels = _cpu(_field(item, "labels", what)).long().flatten().tolist()
        top = self.num_classes
        bad = [v for v in labels if v < 0 or (top is not None and v >= top)]
        if bad:
            allowed = f"0..{top - 1} (num_classes {top})" if top is not None else ">= 0"
            raise ValueError(f"COCOEvaluator: a {what} has label {bad[0]}, but labels must be {allowed}; labels are "
                             f"contiguous class indices, not COCO category ids")
        return labels


def _cpu(value: Any) -> torch.Tensor:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def _field(item: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in item:
        raise ValueError(f"COCOEvaluator: a {what} dict lacks '{key}' (it has {', '.join(map(str, item))}); see the "
                         f"COCOEvaluator docstring for the expected keys")
    return item[key]


def _boxes(item: Mapping[str, Any], what: str) -> list[list[float]]:
    boxes = _cpu(_field(item, "boxes", what)).double()
    if boxes.numel() == 0:
        return []
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"COCOEvaluator: a {what}'s boxes have shape {tuple(boxes.shape)}; expected [N, 4] "
                         f"(x1, y1, x2, y2) in pixels")
    return boxes.tolist()


def _mean_ap(precision: np.ndarray) -> float:
    """Percent AP as COCOeval.summarize() computes it: the mean over entries that exist (-1: a class without
    ground truth)."""
    valid = precision[precision > -1]
    return 100.0 * float(np.mean(valid)) if valid.size else 0.0


def _xywh(box: list[float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]
