"""Datasets that read local files only (nothing downloads): sklearn digits, Fashion-MNIST IDX, CIFAR-10, ImageFolder.

Each returns (float image tensor CxHxW, int label) and exposes `num_classes`.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from hat.data.cifar_batch import read_cifar_batch
from hat.errors import DataError
from hat.registry import register

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


class TensorImageDataset(Dataset):
    """Images already in memory as a uint8 or float array; `transform` runs per sample on the float tensor."""

    num_classes: int = 10

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Callable] = None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def _check_split(split: str, allowed: tuple[str, ...], dataset: str) -> None:
    if split not in allowed:
        raise DataError(f"{dataset}: split must be one of {', '.join(allowed)}, got '{split}'")


def _standardize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (images - mean) / std


@register(kind="dataset")
class DigitsDataset(TensorImageDataset):
    """sklearn's 1,797 real 8x8 handwritten digits (embedded: no files needed); a fixed seeded train/val split."""

    def __init__(self, split: str = "train", val_fraction: float = 0.2, split_seed: int = 0,
                 transform: Optional[Callable] = None):
        from sklearn.datasets import load_digits

        _check_split(split, ("train", "val"), "DigitsDataset")
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.int64)
        order = np.random.RandomState(split_seed).permutation(len(labels))
        n_val = int(round(len(labels) * val_fraction))
        self.indices = torch.as_tensor(order[n_val:] if split == "train" else order[:n_val])  # into load_digits()
        super().__init__(_standardize(images[self.indices], 0.3, 0.4), labels[self.indices], transform)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), plain or gzipped, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(shape)
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}; the file is corrupt or not IDX, reinstall the data") \
            from None


@register(kind="dataset")
class FashionMNIST(TensorImageDataset):
    """Fashion-MNIST from its IDX files (.gz or raw) under `root`; split train (60k) or test (10k)."""

    FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

    def __init__(self, root: str = FASHION_MNIST_ROOT, split: str = "train", transform: Optional[Callable] = None):
        _check_split(split, ("train", "test"), "FashionMNIST")
        images_file, labels_file = (self._find(Path(root), name) for name in self.FILES[split])
        images = torch.from_numpy(read_idx(images_file).copy()).unsqueeze(1).float() / 255.0
        labels = torch.from_numpy(read_idx(labels_file).astype(np.int64))
        if len(images) != len(labels):
            raise DataError(f"FashionMNIST: {images_file} holds {len(images)} images but {labels_file} "
                            f"{len(labels)} labels; the files are from different sets")
        super().__init__(_standardize(images, 0.286, 0.353), labels, transform)

    @staticmethod
    def _find(root: Path, name: str) -> Path:
        for candidate in (root / f"{name}.gz", root / name):
            if candidate.is_file():
                return candidate
        raise DataError(f"FashionMNIST: {name}(.gz) not found under data root '{root}'. Install the data with "
                        f"`apt-get install dataset-fashion-mnist` (puts it in {FASHION_MNIST_ROOT}) or set "
                        f"data.train.root / data.val.root to the folder holding the IDX files")


@register(kind="dataset")
class CIFAR10(TensorImageDataset):
    """CIFAR-10 from a local torchvision-layout root (`root/cifar-10-batches-py/`); never downloads, and reads the
    batch pickles with a reader that refuses anything but arrays, lists and strings (a hostile file runs nothing)."""

    def __init__(self, root: str, split: str = "train", transform: Optional[Callable] = None):
        _check_split(split, ("train", "test"), "CIFAR10")
        folder = Path(root) / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DataError(f"CIFAR10: {', '.join(missing)} not found in '{folder}'. Extract cifar-10-python.tar.gz "
                            f"(from the CIFAR-10 site) into data root '{root}' or set data.*.root")
        images, labels = [], []
        for name in names:
            pixels, batch_labels = read_cifar_batch(folder / name)  # arrays, lists and strings only: runs no code
            images.append(pixels.reshape(-1, 3, 32, 32))
            labels.extend(batch_labels)
        data = torch.from_numpy(np.concatenate(images)).float() / 255.0
        mean = torch.tensor([0.491, 0.482, 0.447]).view(1, 3, 1, 1)
        std = torch.tensor([0.247, 0.243, 0.262]).view(1, 3, 1, 1)
        super().__init__((data - mean) / std, torch.tensor(labels), transform)


@register(kind="dataset")
class ImageFolder(Dataset):
    """Images in `root/<split>/<class>/*.png|jpg`, resized to `image_size`, scaled to [0, 1] then standardized."""

    def __init__(self, root: str, split: str = "train", image_size: int = 224, transform: Optional[Callable] = None):
        from torchvision import datasets, transforms

        folder = Path(root) / split
        if not folder.is_dir():
            raise DataError(f"ImageFolder: folder '{folder}' not found; expected root/{split}/<class>/<image> "
                            f"files (set data.*.root and data.*.split)")
        base = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                                   transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
        self.inner = datasets.ImageFolder(str(folder), transform=base)
        self.num_classes = len(self.inner.classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        image, label = self.inner[index]
        return (self.transform(image) if self.transform else image), label
