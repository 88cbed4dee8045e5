import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from pycocotools import mask as mask_utils
from PIL import Image
from torchvision.transforms import v2

from hat.data import build_dataset, build_loader
from hat.data.coco import CocoDetection, CocoSegmentation
from hat.data.scenes import make_scenes
from hat.errors import DataError

H, W = 10, 12


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("coco") / "digits", num_train=6, num_val=4)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [H, W], "counts": rle["counts"].decode()}


@pytest.fixture
def handmade(tmp_path):
    """Two RGB 12x10 images: one with a cat (id 3), a dog (id 7), a crowd region and a sub-pixel box; one empty."""
    (tmp_path / "pics").mkdir()
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    image[0, 2:5, 0:3] = 200  # the cat, red
    image[1, 1:6, 6:9] = 100  # the dog, green
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "pics" / "a.png")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "pics" / "b.png")
    cat, dog, crowd = (np.zeros((H, W), np.uint8) for _ in range(3))
    cat[2:5, 0:3] = 1
    dog[1:6, 6:9] = 1
    crowd[7:9, 0:12] = 1
    coco = {"images": [{"id": 5, "file_name": "a.png", "width": W, "height": H},
                       {"id": 9, "file_name": "b.png", "width": W, "height": H}],
            "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
            "annotations": [
                {"id": 1, "image_id": 5, "category_id": 3, "bbox": [0, 2, 3, 3], "area": 9, "iscrowd": 0,
                 "segmentation": _rle(cat)},
                {"id": 2, "image_id": 5, "category_id": 7, "bbox": [6, 1, 3, 5], "area": 15, "iscrowd": 0,
                 "segmentation": _rle(dog)},
                {"id": 3, "image_id": 5, "category_id": 7, "bbox": [0, 7, 12, 2], "area": 24, "iscrowd": 1,
                 "segmentation": _rle(crowd)},
                {"id": 4, "image_id": 5, "category_id": 3, "bbox": [10, 0, 0.5, 4], "area": 1, "iscrowd": 0,
                 "segmentation": []}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return dict(root=str(tmp_path), images=str(tmp_path / "pics"), annotations=str(tmp_path / "ann.json"))


def test_detection_on_scenes_matches_the_json(scenes):
    data = CocoDetection(str(scenes), "train")
    coco = json.loads((scenes / "annotations" / "instances_train.json").read_text())
    assert len(data) == 6 and data.num_classes == 10 and data.class_names[3] == "3"
    assert data.cat_ids == list(range(1, 11))
    for i in range(len(data)):
        image, target = data[i]
        assert image.shape == (1, 64, 64) and image.dtype == torch.float32
        assert -1 <= image.min() and image.max() <= 1 and image.min() == -1  # black background -> -1
        assert set(target) == {"boxes", "labels", "image_id"}
        anns = [a for a in coco["annotations"] if a["image_id"] == int(target["image_id"])]
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                                dtype=torch.float32)
        assert target["boxes"].dtype == torch.float32 and torch.equal(target["boxes"], expected)
        assert target["labels"].dtype == torch.int64
        assert target["labels"].tolist() == [a["category_id"] - 1 for a in anns]
        assert target["image_id"].dtype == torch.int64 and target["image_id"].shape == ()


def test_masks_lie_in_their_boxes(scenes):
    image, target = CocoDetection(str(scenes), "val", masks=True)[0]
    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (len(target["boxes"]), 64, 64)
    for mask, (x1, y1, x2, y2) in zip(masks, target["boxes"].int().tolist()):
        assert mask.sum() == mask[y1:y2, x1:x2].sum() > 0
        assert (image[0][mask.bool()] > -0.5).all()  # mask pixels are > 0.25 bright: (0.25 - 0.5) / 0.5


def test_handmade_coco_labels_boxes_crowd_and_negatives(handmade):
    data = CocoDetection(**handmade, masks=True)
    assert (data.cat_ids, data.class_names, data.num_classes, len(data)) == ([3, 7], ["cat", "dog"], 2, 2)
    image, target = data[0]
    assert image.shape == (3, H, W)
    assert torch.allclose(image[:, 3, 1], torch.tensor([200 / 255 * 2 - 1, -1, -1]))
    assert target["boxes"].tolist() == [[0, 2, 3, 5], [6, 1, 9, 6]]  # crowd and the 0.5-wide box skipped
    assert target["labels"].tolist() == [0, 1] and int(target["image_id"]) == 5
    assert target["masks"][0].sum() == 9 and target["masks"][1][1:6, 6:9].all()
    image, target = data[1]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and target["masks"].shape == (0, H, W)


def test_custom_mean_std_per_channel(handmade):
    image, _ = CocoDetection(**handmade, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 0.5])[0]
    assert image[0, 3, 1] == pytest.approx(200 / 255) and image.min() == 0
    with pytest.raises(DataError, match="mean/std have 2/1 values but the images have 3 channels"):
        CocoDetection(**handmade, mean=[0.5, 0.5])[0]
    assert CocoDetection(**handmade, channels=1)[0][0].shape == (1, H, W)


def test_flip_moves_boxes_and_masks_with_the_image(handmade):
    plain = CocoDetection(**handmade, masks=True)
    flipped = CocoDetection(**handmade, masks=True, transform=v2.Compose([v2.RandomHorizontalFlip(p=1)]))
    (image, target), (image_f, target_f) = plain[0], flipped[0]
    assert torch.equal(image_f, image.flip(-1))
    assert target_f["boxes"].tolist() == [[W - 3, 2, W, 5], [W - 9, 1, W - 6, 6]]
    assert torch.equal(target_f["masks"], target["masks"].flip(-1)) and torch.equal(target_f["labels"],
                                                                                      target["labels"])
    assert all(type(v) is torch.Tensor for v in target_f.values()) and type(image_f) is torch.Tensor


def test_boxes_cropped_away_are_dropped_with_their_labels(handmade):
    data = CocoDetection(**handmade, masks=True, transform=v2.CenterCrop((H, 4)))  # keeps columns 4..7
    image, target = data[0]
    assert image.shape == (3, H, 4)
    assert target["boxes"].tolist() == [[2, 1, 4, 6]] and target["labels"].tolist() == [1]
    assert target["masks"].shape == (1, H, 4)


def test_segmentation_paints_labels_and_ignores_crowds(handmade):
    data = CocoSegmentation(**handmade)
    assert data.num_classes == 3 and data.class_names == ["background", "cat", "dog"]
    image, mask = data[0]
    assert mask.dtype == torch.int64 and mask.shape == (H, W)
    expected = torch.zeros(H, W, dtype=torch.int64)
    expected[2:5, 0:3], expected[1:6, 6:9], expected[7:9, :] = 1, 2, 255
    expected[0:4, 10] = 1  # an annotation without segmentation paints its box (here 0.5 px wide: one column)
    assert torch.equal(mask, expected)
    _, flipped = CocoSegmentation(**handmade, transform=v2.RandomHorizontalFlip(p=1))[0]
    assert torch.equal(flipped, expected.flip(-1))


def test_missing_annotations_say_how_to_make_them(tmp_path):
    with pytest.raises(DataError, match=r"instances_train.json not found.*tools/make_scenes.py --source digits"):
        CocoDetection(str(tmp_path))


def test_missing_image_names_the_file(handmade, tmp_path):
    (tmp_path / "pics" / "b.png").unlink()
    with pytest.raises(DataError, match=r"image .*b.png \(id 9 in .*ann.json\) not found; set data.\*.images"):
        CocoDetection(**handmade)[1]


def test_corrupt_json_names_the_file(handmade, tmp_path):
    (tmp_path / "ann.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read COCO annotations .*ann.json"):
        CocoDetection(**handmade)


def test_scenes_are_generated_on_first_use(tmp_path):
    root = tmp_path / "gen"
    data = CocoDetection(str(root), "val", scenes={"num_train": 3, "num_val": 2, "seed": 4})
    assert len(data) == 2 and (root / "train" / "000003.png").is_file()
    assert len(CocoDetection(str(root), "train", scenes={"num_train": 3, "num_val": 2, "seed": 4})) == 3
    with pytest.raises(DataError, match="other settings"):
        CocoDetection(str(root), "train", scenes={"num_train": 3, "num_val": 2})


def test_collate_batches_variable_box_counts(handmade):
    data = CocoDetection(**handmade)
    images, targets = CocoDetection.collate_fn([data[0], data[1]])
    assert images.shape == (2, 3, H, W) and [len(t["boxes"]) for t in targets] == [2, 0]


def test_built_from_a_config_and_loaded(scenes):
    cfg = OmegaConf.create({"batch_size": 4, "val_batch_size": None, "num_workers": 0,
                            "train": {"type": "CocoDetection", "root": str(scenes), "split": "train"},
                            "train_transforms": [{"type": "RandomHorizontalFlip", "p": 0.5}],
                            "val": {"type": "CocoSegmentation", "root": str(scenes), "split": "val"}})
    train = build_dataset(cfg, "train")
    assert isinstance(train, CocoDetection) and train.transform is not None
    images, targets = next(iter(build_loader(train, cfg, train=True, seed=0)))
    assert images.shape == (4, 1, 64, 64) and isinstance(targets, list) and len(targets) == 4
    assert all(t["boxes"].shape[1] == 4 and len(t["labels"]) == len(t["boxes"]) for t in targets)
    images, masks = next(iter(build_loader(build_dataset(cfg, "val"), cfg, train=False, seed=0)))
    assert images.shape == (4, 1, 64, 64) and masks.shape == (4, 64, 64) and masks.dtype == torch.int64
