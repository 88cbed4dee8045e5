"""MeanIoU: a hand-made confusion with known per-class IoU, ignored pixels, logits, errors, registry, ranks."""
from __future__ import annotations

import math

import pytest
import torch

import hat.evaluation  # noqa: F401  (registers the evaluators until hat.registry lists the package)
from hat.engine import distributed
from hat.evaluation import MeanIoU
from hat.registry import build

# A 2x3 image, 3 classes. Pixels (target -> prediction): 0->0, 0->1, 1->1 / 1->1, 2->2, 2->2.
TARGET = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
PRED = torch.tensor([[[0, 1, 1], [1, 2, 2]]])
# IoU = hits / (target pixels + predicted pixels - hits):
# class 0: 1 / (2 + 1 - 1) = 1/2, class 1: 2 / (2 + 3 - 2) = 2/3, class 2: 2 / (2 + 2 - 2) = 1; 5 of 6 pixels right.
HAND_IOU = [50.0, 200 / 3, 100.0]


def test_hand_confusion():
    miou = MeanIoU(num_classes=3)
    miou.update(PRED, TARGET)
    assert miou.per_class_iou() == pytest.approx(HAND_IOU)
    assert miou.compute() == {"val/mIoU": pytest.approx(sum(HAND_IOU) / 3), "val/pixel_acc": pytest.approx(500 / 6)}
    assert miou.main_metric == "val/mIoU"


def test_uneven_classes_and_absent_class():
    """4 classes, class 3 in neither target nor prediction: nan, and left out of the mean."""
    target = torch.tensor([[[0, 0, 0, 1]]])
    pred = torch.tensor([[[0, 0, 1, 1]]])  # class 0: 2 / 3, class 1: 1 / 2, class 2 and 3 absent
    miou = MeanIoU(num_classes=4)
    miou.update(pred, target)
    ious = miou.per_class_iou()
    assert ious[:2] == pytest.approx([200 / 3, 50.0]) and math.isnan(ious[2]) and math.isnan(ious[3])
    assert miou.compute()["val/mIoU"] == pytest.approx((200 / 3 + 50) / 2)


def test_ignored_pixels_count_for_nothing():
    target = TARGET.clone()
    target[0, 0, 0] = 255  # the right 0 -> 0 pixel: class 0 becomes 0 / (1 + 0 - 0), 4 of 5 pixels right
    miou = MeanIoU(num_classes=3)
    miou.update(PRED, target)
    assert miou.per_class_iou() == pytest.approx([0.0, 200 / 3, 100.0])
    assert miou.compute()["val/pixel_acc"] == 80.0


def test_logits_take_the_argmax():
    logits = torch.nn.functional.one_hot(PRED, 3).permute(0, 3, 1, 2).float() * 5 + 0.1
    miou = MeanIoU(num_classes=3)
    miou.update(logits, TARGET)
    assert miou.per_class_iou() == pytest.approx(HAND_IOU)


def test_bad_labels_and_shapes():
    miou = MeanIoU(num_classes=3)
    with pytest.raises(ValueError, match="target pixel has class 7, outside 0..2 \\(num_classes 3"):
        miou.update(PRED, torch.full_like(TARGET, 7))
    with pytest.raises(ValueError, match="prediction pixel has class 3"):
        miou.update(torch.full_like(PRED, 3), TARGET)
    with pytest.raises(ValueError, match="do not fit targets"):
        miou.update(PRED[:, :1], TARGET)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        MeanIoU(num_classes=0)


def test_reset_clears():
    miou = MeanIoU(num_classes=3)
    miou.update(PRED, TARGET)
    miou.reset()
    miou.update(TARGET, TARGET)
    assert miou.compute() == {"val/mIoU": 100.0, "val/pixel_acc": 100.0}


def test_sums_over_ranks(monkeypatch):
    """Two ranks with the same shard: the confusion doubles, the numbers stay."""
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda values: [2 * v for v in values])
    miou = MeanIoU(num_classes=3)
    miou.update(PRED, TARGET)
    assert miou.per_class_iou() == pytest.approx(HAND_IOU)
    assert miou.compute()["val/mIoU"] == pytest.approx(sum(HAND_IOU) / 3)


@pytest.mark.parametrize("cfg, cls", [({"type": "MeanIoU", "num_classes": 3}, "MeanIoU"),
                                      ({"type": "COCOEvaluator", "num_classes": 80}, "COCOEvaluator"),
                                      ({"type": "Accuracy"}, "Accuracy")])
def test_built_from_a_config(cfg, cls):
    evaluator = build(cfg, "evaluator", kind="evaluator")
    assert type(evaluator).__name__ == cls and isinstance(evaluator, hat.evaluation.Evaluator)
