import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from hat.data import build_dataset, build_loader, start_epoch
from hat.data.datasets import CIFAR10, DigitsDataset, FashionMNIST, ImageFolder
from hat.errors import DataError


def test_digits_split_is_fixed_disjoint_and_complete():
    train, val = DigitsDataset("train"), DigitsDataset("val")
    assert (len(train), len(val)) == (1438, 359)
    image, label = train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and 0 <= label < 10
    again = DigitsDataset("train")
    assert torch.equal(train.images, again.images)
    assert len(torch.unique(torch.cat([train.labels, val.labels]))) == 10
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert sorted(train.indices.tolist() + val.indices.tolist()) == list(range(1797))


def test_digits_split_seed_changes_the_split():
    assert not torch.equal(DigitsDataset("val").labels, DigitsDataset("val", split_seed=1).labels)


def _write_idx(path, array, gz):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    (gzip.open if gz else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    images = np.random.RandomState(0).randint(0, 256, (5, 28, 28))
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.arange(5), gz)
    data = FashionMNIST(str(tmp_path), "test")
    assert len(data) == 5 and data[3][1] == 3
    expected = (torch.tensor(images[2], dtype=torch.float32) / 255 - 0.286) / 0.353
    torch.testing.assert_close(data[2][0][0], expected)


def test_fashion_mnist_missing_root_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DataError, match=r"not found under data root .*apt-get install dataset-fashion-mnist"):
        FashionMNIST(str(tmp_path / "nowhere"), "train")


def test_corrupt_idx_file(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03garbage")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"")
    with pytest.raises(DataError, match="cannot read IDX file .*train-images"):
        FashionMNIST(str(tmp_path), "train")


def test_cifar10_from_local_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = np.random.RandomState(0).randint(0, 256, (4, 3072), dtype=np.uint8)
    pickle.dump({"data": data, "labels": [0, 1, 2, 9]}, open(folder / "test_batch", "wb"))
    dataset = CIFAR10(str(tmp_path), "test")
    assert len(dataset) == 4 and dataset[3][1] == 9 and dataset[0][0].shape == (3, 32, 32)
    with pytest.raises(DataError, match="data_batch_1, .* not found"):
        CIFAR10(str(tmp_path), "train")


def test_image_folder(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (10, 12), color=(200, 10, 10)).save(tmp_path / "train" / cls / "a.png")
    dataset = ImageFolder(str(tmp_path), "train", image_size=16)
    assert len(dataset) == 2 and dataset.num_classes == 2 and dataset[1][0].shape == (3, 16, 16)
    with pytest.raises(DataError, match="folder .*val' not found"):
        ImageFolder(str(tmp_path), "val")


def test_unknown_split():
    with pytest.raises(DataError, match="split must be one of train, val, got 'test'"):
        DigitsDataset("test")


def test_loader_order_depends_only_on_seed_and_epoch(digits_cfg):
    cfg = digits_cfg()
    dataset = build_dataset(cfg.data, "train")

    def first_labels(epoch):
        loader = build_loader(dataset, cfg.data, train=True, seed=0)
        start_epoch(loader, epoch)
        return next(iter(loader))[1]

    assert torch.equal(first_labels(1), first_labels(1))
    assert not torch.equal(first_labels(0), first_labels(1))


def test_train_transforms_from_config(digits_cfg):
    cfg = digits_cfg("+data.train_transforms=[{type: RandomCrop, size: 8, padding: 2}]")
    dataset = build_dataset(cfg.data, "train")
    torch.manual_seed(0)
    shifted = sum(not torch.equal(dataset[i][0], dataset.images[i]) for i in range(20))
    assert shifted > 10 and dataset[0][0].shape == (1, 8, 8)


def test_evaluation_shards_cover_every_image_once(digits_cfg):
    cfg = digits_cfg()
    dataset = build_dataset(cfg.data, "val")
    shards = [list(build_loader(dataset, cfg.data, train=False, seed=0, num_replicas=3, rank=r).sampler)
              for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(len(dataset)))


def test_training_shards_split_the_epoch_permutation(digits_cfg):
    cfg = digits_cfg()
    dataset = build_dataset(cfg.data, "train")
    whole = list(build_loader(dataset, cfg.data, train=True, seed=3).sampler)
    halves = [list(build_loader(dataset, cfg.data, train=True, seed=3, num_replicas=2, rank=r).sampler)
              for r in range(2)]
    assert halves[0] == whole[0::2] and halves[1] == (whole + whole[:1])[1::2]  # odd count: one index repeats
