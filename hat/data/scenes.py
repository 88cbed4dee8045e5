"""Deterministic COCO-format scenes made from real images (sklearn digits, Fashion-MNIST): detection and
segmentation data that needs no download.

Each scene is a black grayscale canvas with 1..max_objects real images pasted at random sizes and positions, never
overlapping; every object gets a tight box, a pixel mask (intensity > 0.25) and an RLE segmentation. Train scenes
use only the source's train split, val scenes only its val/test split.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hat.errors import DataError, HatError
from hat.fileio import _host, _writer_alive, default_file_mode

log = logging.getLogger("hat")

SOURCES = ("digits", "fashion_mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
MASK_THRESHOLD = 0.25  # a pixel belongs to an object's mask when its intensity is above this
PLACEMENT_TRIES = 50
TEMP_SUFFIX = ".scenes-tmp"


def make_scenes(out_dir: str | os.PathLike, source: str = "digits", num_train: int = 2000, num_val: int = 500,
                canvas_size: int = 64, min_size: int = 12, max_size: int = 28, max_objects: int = 4, seed: int = 0,
                source_root: Optional[str] = None, *, overwrite: bool = False) -> Path:
    """Write train/val scenes, their COCO annotations and scenes.json into `out_dir`; byte-identical per arguments.

    Generated in a temporary sibling folder and renamed into place, so readers never see half a folder."""
    spec = normalise_spec(source=source, num_train=num_train, num_val=num_val, canvas_size=canvas_size,
                          min_size=min_size, max_size=max_size, max_objects=max_objects, seed=seed,
                          source_root=source_root)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise DataError(f"scenes: '{out_dir}' exists and is not empty; delete it, pick another folder or pass "
                        f"--overwrite (overwrite=True) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{_host()}-{os.getpid()}.", suffix=TEMP_SUFFIX,
                                dir=out_dir.parent))
    try:
        categories = _categories(spec["source"])
        for k, (split, count) in enumerate((("train", spec["num_train"]), ("val", spec["num_val"]))):
            images, labels, indices = _load_source(spec["source"], split, spec["source_root"])
            rng = np.random.RandomState([spec["seed"], k])
            coco = _generate(tmp / split, images, labels, indices, count, rng, spec)
            coco["categories"] = categories
            _write_json(tmp / "annotations" / f"instances_{split}.json", coco)
        _write_json(tmp / "scenes.json", spec, indent=2)
        file_mode = default_file_mode()
        os.chmod(tmp, file_mode | (file_mode & 0o444) >> 2)  # mkdtemp's 0700 -> what mkdir would give
        _move_into_place(tmp, out_dir, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_scenes(out_dir: str | os.PathLike, **spec) -> Path:
    """`out_dir` holding scenes made with `spec` (make_scenes arguments): generated when missing, checked when not."""
    out_dir = Path(out_dir)
    wanted = normalise_spec(**spec)
    annotations = [out_dir / "annotations" / f"instances_{s}.json" for s in ("train", "val")]
    if all(a.is_file() for a in annotations):
        made_with = out_dir / "scenes.json"
        if made_with.is_file():
            try:
                stored = json.loads(made_with.read_text())
            except (OSError, ValueError) as exc:
                raise DataError(f"scenes: cannot read {made_with}: {exc}; delete '{out_dir}' to regenerate it") \
                    from None
            differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            if differ:
                details = ", ".join(f"{k}={stored.get(k)!r} (wanted {wanted.get(k)!r})" for k in differ)
                raise DataError(f"scenes: '{out_dir}' holds scenes made with other settings: {details}; delete the "
                                f"folder to regenerate it, or point data.*.root elsewhere")
        return out_dir
    log.info("generating %s scenes into %s (once; later runs reuse them)", wanted["source"], out_dir)
    return make_scenes(out_dir, **wanted)


def normalise_spec(**spec) -> dict:
    """make_scenes arguments with defaults filled in and checked, as stored in scenes.json."""
    params = {n: p.default for n, p in inspect.signature(make_scenes).parameters.items()
              if n not in ("out_dir", "overwrite")}
    unknown = sorted(set(spec) - set(params))
    if unknown:
        raise DataError(f"scenes: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(params)}")
    spec = {**params, **spec}
    if spec["source"] not in SOURCES:
        raise DataError(f"scenes: source must be one of {', '.join(SOURCES)}, got '{spec['source']}'")
    for key in ("num_train", "num_val", "canvas_size", "min_size", "max_size", "max_objects", "seed"):
        value = spec[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "seed" else 1):
            raise DataError(f"scenes: {key} must be an integer >= {0 if key == 'seed' else 1}, got {value!r}")
    if not spec["min_size"] <= spec["max_size"] <= spec["canvas_size"]:
        raise DataError(f"scenes: need min_size <= max_size <= canvas_size, got {spec['min_size']}, "
                        f"{spec['max_size']}, {spec['canvas_size']}")
    if spec["source"] == "fashion_mnist":
        from hat.data.datasets import FASHION_MNIST_ROOT
        spec["source_root"] = str(spec["source_root"] or FASHION_MNIST_ROOT)
    else:
        spec["source_root"] = None  # digits are embedded in sklearn
    return spec


def _categories(source: str) -> list[dict]:
    names = [str(d) for d in range(10)] if source == "digits" else list(FASHION_CLASSES)
    return [{"id": i + 1, "name": name} for i, name in enumerate(names)]


def _load_source(source: str, split: str, root: Optional[str]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(images float [N,1,h,w] in [0,1], labels, index of each image in its source array) of one split."""
    if source == "digits":
        from sklearn.datasets import load_digits

        from hat.data.datasets import DigitsDataset

        digits = load_digits()
        indices = DigitsDataset(split).indices.numpy()  # exactly the classifier's split: no val digit in train
        images = torch.tensor(digits.images[indices], dtype=torch.float32).unsqueeze(1) / 16.0
        return images, digits.target[indices].astype(np.int64), indices
    from hat.data.datasets import FashionMNIST, read_idx

    images_name, labels_name = FashionMNIST.FILES["train" if split == "train" else "test"]
    pixels = read_idx(FashionMNIST._find(Path(root), images_name))
    labels = read_idx(FashionMNIST._find(Path(root), labels_name)).astype(np.int64)
    if len(pixels) != len(labels):
        raise DataError(f"scenes: Fashion-MNIST under '{root}' has {len(pixels)} {split} images but {len(labels)} "
                        f"labels; the files are from different sets")
    images = torch.from_numpy(pixels.copy()).unsqueeze(1).float() / 255.0
    return images, labels, np.arange(len(labels))


def _generate(folder: Path, images: torch.Tensor, labels: np.ndarray, indices: np.ndarray, count: int,
              rng: np.random.RandomState, spec: dict) -> dict:
    """Write `count` scene PNGs into `folder`; returns their COCO images and annotations."""
    from pycocotools import mask as mask_utils
    from PIL import Image

    folder.mkdir(parents=True)
    size = spec["canvas_size"]
    coco: dict = {"images": [], "annotations": []}
    for image_id in range(1, count + 1):
        canvas = np.zeros((size, size), dtype=np.uint8)
        placed: list[tuple[int, int, int]] = []
        for _ in range(rng.randint(1, spec["max_objects"] + 1)):
            pick = rng.randint(len(labels))
            side = rng.randint(spec["min_size"], spec["max_size"] + 1)
            patch = _patch(images[pick], side)
            ink = patch.astype(np.float64) / 255.0 > MASK_THRESHOLD
            rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
            if not len(rows):
                continue  # nothing above the threshold: no object to annotate
            for _ in range(PLACEMENT_TRIES):
                x, y = rng.randint(size - side + 1), rng.randint(size - side + 1)
                if all(x + side + 1 <= px or px + ps + 1 <= x or y + side + 1 <= py or py + ps + 1 <= y
                       for px, py, ps in placed):
                    break
            else:
                continue  # no free spot: drop the object
            placed.append((x, y, side))
            y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            clipped = np.zeros_like(patch)
            clipped[y0:y1, x0:x1] = patch[y0:y1, x0:x1]  # no faint ink outside the object's box
            region = canvas[y:y + side, x:x + side]
            np.maximum(region, clipped, out=region)
            full = np.zeros((size, size), dtype=np.uint8, order="F")
            full[y:y + side, x:x + side] = ink
            rle = mask_utils.encode(full)
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": int(labels[pick]) + 1,
                "bbox": [int(x + x0), int(y + y0), int(x1 - x0), int(y1 - y0)], "area": int(ink.sum()),
                "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")}, "iscrowd": 0,
                "source_index": int(indices[pick])})
        name = f"{image_id:06d}.png"
        Image.fromarray(canvas).save(folder / name, format="PNG")
        coco["images"].append({"id": image_id, "file_name": name, "width": size, "height": size})
    return coco


def _patch(image: torch.Tensor, side: int) -> np.ndarray:
    """`image` [1,h,w] in [0,1] resized (bilinear, antialiased) to side x side, as uint8."""
    resized = F.interpolate(image.unsqueeze(0), size=(side, side), mode="bilinear", antialias=True,
                            align_corners=False)
    return (resized[0, 0] * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def _write_json(path: Path, obj: dict, indent: Optional[int] = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, separators=None if indent else (",", ":")) + "\n")


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` to `out_dir`; when another process got there first, keep its (identical) copy."""
    old = None
    if overwrite and out_dir.exists():
        old = out_dir.parent / f"{tmp.name}.old"
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)  # replaces an empty folder, fails on a non-empty one
    except OSError:
        if not out_dir.is_dir():
            raise
        log.info("scenes: %s was written by another process meanwhile; keeping that copy", out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_dead_temps(out_dir: Path) -> None:
    """Remove temporary folders of generators of `out_dir` that were killed (on this machine)."""
    for tmp in out_dir.parent.glob(f".{out_dir.name}.*{TEMP_SUFFIX}*"):
        host, _, pid = tmp.name[len(out_dir.name) + 2:].split(".", 1)[0].rpartition("-")
        if pid.isdigit() and not _writer_alive(host, int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line and exit code 2 via main, not argparse's usage dump
        raise HatError(f"{message} (see {self.prog} --help)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line of tools/make_scenes.py; a user error becomes one `error:` line and exit code 2."""
    parser = _Parser(prog="make_scenes.py", description="Write COCO-format scenes made of real images "
                     "(train/, val/, annotations/instances_{train,val}.json, scenes.json) into --out.")
    parser.add_argument("--source", choices=SOURCES, default="digits")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    defaults = normalise_spec()
    for key in ("num_train", "num_val", "canvas_size", "min_size", "max_size", "max_objects", "seed"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=defaults[key])
    parser.add_argument("--source-root", help="Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    try:
        args = vars(parser.parse_args(argv))
        out, overwrite = args.pop("out"), args.pop("overwrite")
        out_dir = make_scenes(out, **args, overwrite=overwrite)
        for split in ("train", "val"):
            coco = json.loads((out_dir / "annotations" / f"instances_{split}.json").read_text())
            print(f"{out_dir / split}: {len(coco['images'])} images, {len(coco['annotations'])} objects")
        print(f"annotations in {out_dir / 'annotations'}, settings in {out_dir / 'scenes.json'}")
        return 0
    except HatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 2
