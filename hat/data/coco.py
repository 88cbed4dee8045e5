"""COCO-format detection and segmentation datasets (read with pycocotools), for configs: `type: CocoDetection`.

The default layout is the one tools/make_scenes.py writes: images in root/<split>/, annotations in
root/annotations/instances_<split>.json; `images` / `annotations` point elsewhere (e.g. COCO's val2017).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from hat.errors import DataError
from hat.registry import register

MAKE_HINT = "run `python tools/make_scenes.py --source digits --out {root}` or set data.*.root / data.*.annotations"


def _load_coco(path: Path):
    """pycocotools' COCO index of `path`, its progress prints silenced; a bad file is a DataError naming it."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise DataError("COCO datasets need pycocotools: `pip install pycocotools`") from None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (ValueError, AssertionError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"cannot read COCO annotations {path}: {type(exc).__name__}: {exc}; the file is corrupt or "
                        f"not COCO JSON (regenerate or fix it)") from None


@register(kind="dataset")
class CocoDetection(Dataset):
    """(image float [C,H,W] standardized, {"boxes" xyxy float [N,4], "labels" int64 [N], "image_id", "masks"?})."""

    def __init__(self, root: str, split: str = "train", images: Optional[str] = None,
                 annotations: Optional[str] = None, scenes: Optional[dict] = None, masks: bool = False,
                 mean: float | list = 0.5, std: float | list = 0.5, transform: Optional[Callable] = None,
                 channels: Optional[int] = None):
        ann_file = Path(annotations) if annotations else Path(root) / "annotations" / f"instances_{split}.json"
        if scenes is not None:
            from hat.data.scenes import ensure_scenes

            ensure_scenes(root, **scenes)
        if not ann_file.is_file():
            raise DataError(f"{type(self).__name__}: annotation file {ann_file} not found; "
                            + MAKE_HINT.format(root=root))
        self.image_dir = Path(images) if images else Path(root) / split
        if not self.image_dir.is_dir():
            raise DataError(f"{type(self).__name__}: image folder {self.image_dir} not found (set data.*.images)")
        if channels not in (None, 1, 3):
            raise DataError(f"{type(self).__name__}: channels must be 1, 3 or null (as stored), got {channels!r}")
        self.coco = _load_coco(ann_file)
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_of = {cat_id: i for i, cat_id in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c].get("name", str(c)) for c in self.cat_ids]
        self.num_classes = len(self.cat_ids)
        self.ids = sorted(self.coco.getImgIds())  # images without annotations stay: they are valid negatives
        self.masks, self.channels, self.transform = masks, channels, transform
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        self.ann_file = ann_file

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        from torchvision import tv_tensors

        image_id = self.ids[index]
        image = self._read_image(image_id)
        anns = self._annotations(image_id)
        keep = [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
        boxes = torch.tensor([a["bbox"] for a in keep], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        target = {"boxes": boxes, "labels": torch.tensor([self.label_of[a["category_id"]] for a in keep],
                                                         dtype=torch.int64),
                  "image_id": torch.tensor(image_id, dtype=torch.int64)}
        if self.masks:
            target["masks"] = torch.from_numpy(np.stack([self._mask(a, image.shape[-2:]) for a in keep])
                                               if keep else np.zeros((0, *image.shape[-2:]), np.uint8))
        if self.transform is not None:
            target["boxes"] = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY",
                                                       canvas_size=tuple(image.shape[-2:]))
            if self.masks:
                target["masks"] = tv_tensors.Mask(target["masks"])
            image, target = self.transform(tv_tensors.Image(image), target)
            image, target = self._sanitize(image.as_subclass(torch.Tensor), target)
        return self._standardize(image), target

    @staticmethod
    def collate_fn(batch: list) -> tuple[torch.Tensor, list[dict]]:
        """Images stacked into [B,C,H,W]; targets kept as a list (each image has its own number of boxes)."""
        images, targets = zip(*batch)
        return torch.stack(images), list(targets)

    def _read_image(self, image_id: int) -> torch.Tensor:
        """The image as float [C,H,W] in [0, 1]; grayscale stays 1 channel, RGB 3, alpha dropped."""
        from PIL import Image, UnidentifiedImageError

        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise DataError(f"{type(self).__name__}: image {path} (id {image_id} in {self.ann_file}) not found; "
                            f"set data.*.images to the folder holding the annotations' file_name paths")
        try:
            with Image.open(path) as stored:
                gray = stored.mode in ("1", "L", "LA", "I", "I;16", "F")
                mode = {None: "L" if gray else "RGB", 1: "L", 3: "RGB"}[self.channels]  # alpha dropped
                pixels = np.asarray(stored.convert(mode), dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"{type(self).__name__}: cannot read image {path} (image id {image_id} of "
                            f"{self.ann_file}): {exc}") from None
        image = torch.from_numpy(pixels.copy())
        image = image.unsqueeze(0) if image.dim() == 2 else image.permute(2, 0, 1)
        height, width = info.get("height"), info.get("width")
        if (height, width) != (None, None) and (height, width) != tuple(image.shape[-2:]):
            raise DataError(f"{type(self).__name__}: {path} is {image.shape[-1]}x{image.shape[-2]} but "
                            f"{self.ann_file} says {width}x{height}; fix the annotation's width/height")
        return image.float() / 255.0

    def _annotations(self, image_id: int) -> list[dict]:
        """The image's annotations in file order (crowds included)."""
        return self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))

    def _mask(self, ann: dict, size) -> np.ndarray:
        """The annotation's pixel mask uint8 [H,W]; its box filled when it has no segmentation."""
        if ann.get("segmentation"):
            return self.coco.annToMask(ann).astype(np.uint8)
        mask = np.zeros(tuple(size), np.uint8)
        x, y, w, h = ann["bbox"]
        mask[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = 1
        return mask

    def _standardize(self, image: torch.Tensor) -> torch.Tensor:
        if self.mean.numel() not in (1, image.shape[0]) or self.std.numel() not in (1, image.shape[0]):
            raise DataError(f"{type(self).__name__}: mean/std have {self.mean.numel()}/{self.std.numel()} values "
                            f"but the images have {image.shape[0]} channels; give one value or one per channel")
        return (image - self.mean) / self.std

    @staticmethod
    def _sanitize(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        """Boxes clipped to the image, those thinner than a pixel dropped with their labels and masks."""
        height, width = image.shape[-2:]
        boxes = target["boxes"].as_subclass(torch.Tensor).clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        out = {k: (v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v) for k, v in target.items()}
        out["boxes"], out["labels"] = boxes[keep], out["labels"][keep]
        if "masks" in out:
            out["masks"] = out["masks"][keep]
        return image, out


@register(kind="dataset")
class CocoSegmentation(CocoDetection):
    """(image, semantic mask int64 [H,W]): 0 background, label + 1 on object pixels, 255 (ignore) on crowd regions."""

    IGNORE = 255
    collate_fn = None  # masks stack: the default collate fits

    def __init__(self, root: str, split: str = "train", images: Optional[str] = None,
                 annotations: Optional[str] = None, scenes: Optional[dict] = None, mean: float | list = 0.5,
                 std: float | list = 0.5, transform: Optional[Callable] = None, channels: Optional[int] = None):
        super().__init__(root, split, images, annotations, scenes, False, mean, std, transform, channels)
        if self.num_classes + 1 >= self.IGNORE:
            raise DataError(f"CocoSegmentation: {self.num_classes} categories in {self.ann_file}; at most "
                            f"{self.IGNORE - 2} fit a mask with {self.IGNORE} as ignore")
        self.num_classes += 1
        self.class_names = ["background", *self.class_names]

    def __getitem__(self, index: int):
        from torchvision import tv_tensors

        image_id = self.ids[index]
        image = self._read_image(image_id)
        size = image.shape[-2:]
        semantic = torch.zeros(tuple(size), dtype=torch.uint8)
        for ann in self._annotations(image_id):  # in file order: later annotations paint over earlier
            value = self.IGNORE if ann.get("iscrowd", 0) else self.label_of[ann["category_id"]] + 1
            semantic[torch.from_numpy(self._mask(ann, size)).bool()] = value
        if self.transform is not None:
            image, semantic = self.transform(tv_tensors.Image(image), tv_tensors.Mask(semantic))
            image, semantic = image.as_subclass(torch.Tensor), semantic.as_subclass(torch.Tensor)
        return self._standardize(image), semantic.to(torch.int64)
