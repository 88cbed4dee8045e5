"""FCOS: target assignment on hand-made boxes, decoding + NMS on hand-made outputs, and a loss that trains."""
import math

import pytest
import torch

from hat.models.fcos import FCOSHead
from hat.models.fcos_targets import fcos_targets, level_points


def _points(sizes, strides):
    points = torch.cat([level_points(h, w, s) for (h, w), s in zip(sizes, strides)])
    per_point = torch.cat([torch.full((h * w,), float(s)) for (h, w), s in zip(sizes, strides)])
    return points, per_point


def test_level_points_are_cell_centers():
    assert level_points(2, 3, 4).tolist() == [[2, 2], [6, 2], [10, 2], [2, 6], [6, 6], [10, 6]]


def test_center_sampling_and_level_ranges_pick_the_hand_computed_points():
    # one 16x16 box centred at (16, 16); 8x8 points of stride 4 (centers 2, 6, ...) and 4x4 of stride 8 (4, 12, ...)
    points, strides = _points([(8, 8), (4, 4)], [4, 8])
    target = {"boxes": torch.tensor([[8.0, 8.0, 24.0, 24.0]]), "labels": torch.tensor([3])}
    labels, boxes, centerness = fcos_targets(points, strides, [(0, 12), (12, math.inf)], [target], radius=1.5)
    positive = {tuple(points[i].int().tolist()): (int(strides[i]), float(centerness[0, i]))
                for i in torch.nonzero(labels[0] >= 0).flatten()}
    # stride 4: |x - 16| < 6 -> x in {14, 18}; the largest side distance (10) is within [0, 12]
    # stride 8: |x - 16| < 12 -> x in {12, 20}; largest distance 12 is within [12, inf)
    expected = {(x, y): 4 for x in (14, 18) for y in (14, 18)} | {(x, y): 8 for x in (12, 20) for y in (12, 20)}
    assert {p: s for p, (s, _) in positive.items()} == expected
    assert positive[(14, 14)][1] == pytest.approx(math.sqrt(0.6 * 0.6))  # l=t=6, r=b=10
    assert positive[(12, 12)][1] == pytest.approx(math.sqrt(4 / 12 * 4 / 12))
    assert (labels[0][labels[0] >= 0] == 3).all()
    assert (boxes[0][labels[0] >= 0] == target["boxes"][0]).all()
    assert (centerness[0][labels[0] < 0] == 0).all()


def test_a_point_in_two_boxes_regresses_the_smaller_and_an_empty_image_has_no_positives():
    points, strides = _points([(8, 8)], [4])
    big = [0.0, 0.0, 32.0, 32.0]
    small = [10.0, 10.0, 22.0, 22.0]
    targets = [{"boxes": torch.tensor([big, small]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    labels, boxes, _ = fcos_targets(points, strides, [(0, math.inf)], targets, radius=1.5)
    at_16 = int(((points[:, 0] == 14) & (points[:, 1] == 14)).nonzero())  # inside both, near both centers
    assert labels[0, at_16] == 2 and boxes[0, at_16].tolist() == small
    assert (labels[1] == -1).all()


def _head(**kwargs):
    return FCOSHead(8, num_classes=3, strides=[4, 8], regress_ranges=[12], **kwargs)


def _outputs(n=1):
    """Raw outputs of a 32x32 image: nothing anywhere (logits -10), box distances of one stride."""
    return {"cls_s4": torch.full((n, 3, 8, 8), -10.0), "box_s4": torch.zeros(n, 4, 8, 8),
            "ctr_s4": torch.full((n, 1, 8, 8), 10.0), "cls_s8": torch.full((n, 3, 4, 4), -10.0),
            "box_s8": torch.zeros(n, 4, 4, 4), "ctr_s8": torch.full((n, 1, 4, 4), 10.0)}


def test_decoding_and_classwise_nms_on_hand_made_outputs():
    out = _outputs()
    # the stride-4 point (row 2, col 3) = (14, 10): class 1, distances exp(log 2) * 4 = 8 px each side
    out["cls_s4"][0, 1, 2, 3] = 5.0
    out["box_s4"][0, :, 2, 3] = math.log(2.0)
    # its neighbour (18, 10) predicts almost the same box for class 1 (suppressed) and for class 2 (kept)
    out["cls_s4"][0, 1, 2, 4] = 4.0
    out["cls_s4"][0, 2, 2, 4] = 3.0
    out["box_s4"][0, :, 2, 4] = torch.tensor([math.log(3.0), math.log(2.0), math.log(1.0), math.log(2.0)])
    [result] = _head().postprocess(out)
    assert result["labels"].tolist() == [1, 2]
    assert result["boxes"][0].tolist() == [6.0, 2.0, 22.0, 18.0]
    assert result["boxes"][1].tolist() == [6.0, 2.0, 22.0, 18.0]
    expected = math.sqrt(torch.sigmoid(torch.tensor(5.0)) * torch.sigmoid(torch.tensor(10.0)))
    assert float(result["scores"][0]) == pytest.approx(expected)


def test_decoding_clips_to_the_image_and_drops_scores_under_the_threshold():
    out = _outputs(2)
    out["cls_s8"][1, 0, 0, 0] = 3.0                # point (4, 4) with 40 px distances: clipped to the 32x32 image
    out["box_s8"][1, :, 0, 0] = math.log(5.0)
    out["cls_s8"][1, 2, 3, 3] = -4.0                 # sqrt(sigmoid(-4)) = 0.134 > 0.05, kept
    out["cls_s8"][1, 1, 3, 2] = -8.0                 # sqrt(sigmoid(-8)) = 0.018 < 0.05, dropped
    first, second = _head().postprocess(out)
    assert len(first["boxes"]) == 0
    assert second["labels"].tolist() == [0, 2]
    assert second["boxes"][0].tolist() == [0.0, 0.0, 32.0, 32.0]


def test_the_loss_trains_the_head_towards_the_targets():
    torch.manual_seed(0)
    head = _head()
    features = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 20.0, 18.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[10.0, 2.0, 30.0, 30.0], [0.0, 0.0, 6.0, 8.0]]), "labels": torch.tensor([0, 1])}]
    optimizer = torch.optim.Adam(head.parameters(), 0.01)
    first = None
    for _ in range(60):
        losses = head.loss(head(features), targets)
        assert set(losses) == {"loss_cls", "loss_box", "loss_ctr"}
        total = sum(losses.values())
        first = first if first is not None else float(total.detach())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert float(total.detach()) < 0.5 * first
    head.eval()
    found = head.postprocess(head(features))
    assert 2 in found[0]["labels"][:1].tolist()


def test_a_wrong_regress_ranges_length_is_a_clear_error():
    with pytest.raises(ValueError, match="regress_ranges takes 1 boundaries"):
        FCOSHead(8, 3, strides=[4, 8], regress_ranges=[12, 24])
