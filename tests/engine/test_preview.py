"""Predictions drawn on their images: boxes above the score threshold, per-pixel classes, refusals."""
import pytest
import torch

from hat.engine.preview import can_draw, draw


def test_boxes_above_the_threshold_are_drawn_and_the_rest_left_alone():
    images = torch.full((2, 1, 16, 16), -1.0)
    images[:, :, 0, 0] = 1.0  # rescaled: background 0, one white pixel
    boxes = {"boxes": torch.tensor([[2.0, 2.0, 10.0, 12.0], [4.0, 4.0, 6.0, 6.0]]),
             "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 0])}
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    drawn = draw(images, [boxes, empty], ["zero", "one"])
    assert drawn.shape == (2, 3, 16, 16) and drawn.dtype == torch.uint8
    assert drawn[0, :, 2, 5].tolist() == [255, 255, 0]   # the box's top edge, yellow
    assert drawn[0, :, 5, 5].tolist() == [0, 0, 0]       # inside it, and the low-score box, untouched
    assert drawn[1].sum() == 3 * 255                     # no box: only the white pixel


def test_segmentation_classes_color_their_pixels_and_background_stays():
    images = torch.zeros(1, 1, 4, 4)
    classes = torch.zeros(1, 4, 4, dtype=torch.long)
    classes[0, :2, :2] = 3
    drawn = draw(images, classes)
    assert (drawn[0, :, :2, :2] != 0).any(dim=0).all() and (drawn[0, :, 2:, 2:] == 0).all()


def test_what_cannot_be_drawn_is_refused():
    assert not can_draw(torch.randn(2, 10)) and not can_draw(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="only detection boxes or segmentation maps"):
        draw(torch.zeros(2, 1, 4, 4), torch.randn(2, 10))
