"""COCOEvaluator against APs computed by hand, and against pycocotools called directly on a seeded case."""
from __future__ import annotations

import contextlib
import io
import random

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hat.engine import distributed
from hat.evaluation import COCOEvaluator


def target(image_id: int, boxes: list, labels: list, **extra) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "image_id": torch.tensor(image_id), **extra}


def pred(boxes: list, scores: list, labels: list) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}


def evaluate(preds: list, targets: list, **kwargs) -> dict:
    evaluator = COCOEvaluator(**kwargs)
    evaluator.update(preds, targets)
    return evaluator.compute()


def approx(mAP: float, mAP50: float):
    """COCOeval's precision is tp / (tp + fp + eps): a perfect 100 comes out as 99.99999999999997."""
    return pytest.approx({"val/mAP": mAP, "val/mAP50": mAP50}, abs=1e-9)


GT = [target(1, [[10, 10, 50, 60], [60, 20, 90, 40]], [0, 1]), target(2, [[5, 5, 25, 45]], [0])]


def test_perfect_predictions():
    preds = [pred(t["boxes"].tolist(), [0.9] * len(t["labels"]), t["labels"].tolist()) for t in GT]
    assert evaluate(preds, GT) == approx(100, 100)
    assert COCOEvaluator.main_metric == "val/mAP"


def test_one_of_two_found():
    """Two boxes of one class, one found exactly: recall 0.5 at precision 1, then nothing. COCO's AP is the
    mean precision at the 101 recalls 0, 0.01, ..., 1: the 51 recalls <= 0.5 have precision 1, the 50 above it
    have 0, so AP = 51/101 = 50.495...%, not 50%, at every IoU threshold."""
    gt = [target(7, [[0, 0, 10, 10], [20, 20, 40, 40]], [2, 2])]
    metrics = evaluate([pred([[0, 0, 10, 10]], [0.8], [2])], gt)
    assert metrics == approx(100 * 51 / 101, 100 * 51 / 101)


def test_iou_between_50_and_55():
    """IoU 52/100 matches at the threshold 0.5 only: AP 1 there, 0 at 0.55 ... 0.95, so mAP = 1/10."""
    gt = [target(3, [[0, 0, 10, 10]], [0])]
    metrics = evaluate([pred([[0, 0, 10, 5.2]], [0.5], [0])], gt)
    assert metrics == approx(10, 100)


def test_wrong_label_scores_nothing():
    gt = [target(3, [[0, 0, 10, 10]], [0])]
    assert evaluate([pred([[0, 0, 10, 10]], [0.9], [1])], gt) == {"val/mAP": 0.0, "val/mAP50": 0.0}


def test_no_detections_and_no_ground_truth():
    empty = [pred([], [], []) for _ in GT]
    assert evaluate(empty, GT) == {"val/mAP": 0.0, "val/mAP50": 0.0}
    with pytest.raises(ValueError, match="no ground-truth boxes"):
        evaluate([pred([[0, 0, 1, 1]], [0.5], [0])], [target(1, [], [])])


def seeded_case(seed: int = 0, images: int = 6, classes: int = 3) -> tuple[list, list]:
    """Jittered, relabelled and invented boxes with random scores over several images and classes."""
    rng = random.Random(seed)
    targets, preds = [], []
    for image_id in range(100, 100 + images):
        gt_boxes, gt_labels, boxes, scores, labels = [], [], [], [], []
        for _ in range(rng.randint(0, 5)):
            x, y, w, h = rng.uniform(0, 200), rng.uniform(0, 200), rng.uniform(4, 80), rng.uniform(4, 80)
            gt_boxes.append([x, y, x + w, y + h])
            gt_labels.append(rng.randrange(classes))
            if rng.random() < 0.8:
                j = [rng.uniform(-0.15, 0.15) * s for s in (w, h, w, h)]
                boxes.append([x + j[0], y + j[1], x + w + j[2], y + h + j[3]])
                labels.append(gt_labels[-1] if rng.random() < 0.85 else rng.randrange(classes))
                scores.append(rng.random())
        for _ in range(rng.randint(0, 3)):
            x, y = rng.uniform(0, 200), rng.uniform(0, 200)
            boxes.append([x, y, x + rng.uniform(4, 60), y + rng.uniform(4, 60)])
            labels.append(rng.randrange(classes))
            scores.append(rng.random())
        targets.append(target(image_id, gt_boxes, gt_labels))
        preds.append(pred(boxes, scores, labels))
    return preds, targets


def pycocotools_directly(preds: list, targets: list) -> dict:
    """The same case through COCO() + loadRes + COCOeval, with the default parameters (maxDets 100)."""
    def xywh(b):
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]

    images, annotations, results = [], [], []
    for p, t in zip(preds, targets):
        image_id = int(t["image_id"])
        images.append({"id": image_id})
        for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": xywh(box), "area": xywh(box)[2] * xywh(box)[3], "iscrowd": 0})
        for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": label + 1, "bbox": xywh(box), "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c} for c in (1, 2, 3)]}
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes(results), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {"val/mAP": 100 * coco_eval.stats[0], "val/mAP50": 100 * coco_eval.stats[1]}


def test_same_as_pycocotools_directly():
    preds, targets = seeded_case()
    expected = pycocotools_directly(preds, targets)
    assert 0 < expected["val/mAP"] < expected["val/mAP50"] < 100  # a case that tells numbers apart
    evaluator = COCOEvaluator()
    for i in range(0, len(preds), 2):  # several batches
        evaluator.update(preds[i:i + 2], targets[i:i + 2])
    assert evaluator.compute() == pytest.approx(expected, abs=1e-9)


def test_two_ranks_give_the_whole_set(monkeypatch):
    """Each rank evaluates its shard; compute() gathers both and matches one process over everything."""
    preds, targets = seeded_case(seed=1)
    shards = [COCOEvaluator(), COCOEvaluator()]
    for rank, shard in enumerate(shards):
        shard.update(preds[rank::2], targets[rank::2])
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object",
                        lambda out, obj: out.__setitem__(slice(None), [s.images for s in shards]))
    expected = pycocotools_directly(preds, targets)
    assert shards[0].compute() == pytest.approx(expected, abs=1e-9)
    shards[1].update(preds[:1], targets[:1])  # rank 1 also saw rank 0's first image: a padded shard
    with pytest.raises(ValueError, match="evaluated on two ranks"):
        shards[0].compute()


def test_repeated_image_id_is_an_error():
    evaluator = COCOEvaluator()
    evaluator.update([pred([], [], [])], [GT[0]])
    with pytest.raises(ValueError, match="image_id 1 was seen twice"):
        evaluator.update([pred([], [], [])], [GT[0]])


def test_reset_clears():
    evaluator = COCOEvaluator()
    evaluator.update([pred([[0, 0, 5, 5]], [0.9], [1]) for _ in GT], GT)
    evaluator.reset()
    evaluator.update([pred(t["boxes"].tolist(), [0.9] * len(t["labels"]), t["labels"].tolist()) for t in GT], GT)
    assert evaluator.compute() == approx(100, 100)


def test_bad_inputs():
    with pytest.raises(ValueError, match="label 3, but labels must be 0..2 \\(num_classes 3\\)"):
        COCOEvaluator(num_classes=3).update([pred([], [], [])], [target(1, [[0, 0, 1, 1]], [3])])
    with pytest.raises(ValueError, match="lacks 'image_id'"):
        COCOEvaluator().update([pred([], [], [])], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}])
    with pytest.raises(ValueError, match="iou_type 'segm' is not supported"):
        COCOEvaluator(iou_type="segm")


def test_sizes_and_max_detections():
    """A target's size (h, w) becomes the image's height/width; max_detections=1 keeps only the best box."""
    gt = [target(5, [[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], size=torch.tensor([480, 640]))]
    both = pred([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [0, 0])
    evaluator = COCOEvaluator(max_detections=1)
    evaluator.update([both], gt)
    assert evaluator.images[0].size == (480, 640)
    assert evaluator.compute() == approx(100 * 51 / 101, 100 * 51 / 101)
    assert evaluate([both], gt) == approx(100, 100)
