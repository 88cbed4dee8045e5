import gzip
import io
import os
import pickle
import pickletools
import struct

import numpy as np
import pytest
import torch

from hat.cli import train_main
from hat.data import build_dataset, build_loader, start_epoch
from hat.data.datasets import CIFAR10, DigitsDataset, FashionMNIST, ImageFolder
from hat.errors import DataError
from tests.conftest import DIGITS


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


class _Python2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 `str` (BINSTRING), as the CIFAR-10 files (Python 2 cPickle) hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_python2_str(self, obj):
        raw = obj if isinstance(obj, bytes) else obj.encode("latin1")
        self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = _save_python2_str


def _genuine_batch(n=4, seed=0, labels=None):
    """A batch dict in the CIFAR-10 layout."""
    data = np.random.RandomState(seed).randint(0, 256, (n, 3072), dtype=np.uint8)
    return {"batch_label": "training batch 1 of 5", "labels": labels or [i % 10 for i in range(n)], "data": data,
            "filenames": [f"img_{i}.png" for i in range(n)]}


def _python2_pickle(batch):
    """`batch` as the real files are: protocol 2, Python 2 strings, numpy 1's module name for `_reconstruct`."""
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(batch)
    return out.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _cifar_root(tmp_path, **files):
    """root/cifar-10-batches-py with the five train batches and the test batch (genuine unless given in `files`)."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        (folder / name).write_bytes(files.get(name, _python2_pickle(_genuine_batch(seed=i))))
    return folder


def test_cifar10_reads_the_python2_format_of_the_real_files(tmp_path):
    batch = _genuine_batch(labels=[3, 9, 0, 1])
    payload = _python2_pickle(batch)
    globals_used = {arg for op, arg, _ in pickletools.genops(payload) if "GLOBAL" in op.name}
    assert globals_used == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    _cifar_root(tmp_path, test_batch=payload)
    dataset = CIFAR10(str(tmp_path), "test")
    assert dataset.labels.tolist() == [3, 9, 0, 1]
    pixels = torch.from_numpy(batch["data"][2].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(dataset.images[2] * dataset.images.new_tensor([0.247, 0.243, 0.262]).view(3, 1, 1)
                          + dataset.images.new_tensor([0.491, 0.482, 0.447]).view(3, 1, 1), pixels, atol=1e-6)
    assert len(CIFAR10(str(tmp_path), "train")) == 20


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar10_reads_batches_pickled_by_python3(tmp_path, protocol):
    batch = _genuine_batch(labels=[5, 6, 7, 8])
    _cifar_root(tmp_path, test_batch=pickle.dumps(batch, protocol=protocol))
    assert CIFAR10(str(tmp_path), "test").labels.tolist() == [5, 6, 7, 8]


class _Payload:
    """Unpickling calls `call(*args)`: what a hostile batch file does."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _hostile_payloads(marker):
    return {"os.system": _Payload(os.system, f"touch '{marker}'"), "open": _Payload(open, str(marker), "w"),
            "eval": _Payload(eval, f"open({str(marker)!r}, 'w')")}


@pytest.mark.parametrize("attack", ["os.system", "open", "eval"])
@pytest.mark.parametrize("where", ["top", "in_labels"])
def test_a_hostile_cifar_batch_runs_nothing_and_is_refused(tmp_path, attack, where):
    marker = tmp_path / "pwned"
    payload = _hostile_payloads(marker)[attack]
    batch = payload if where == "top" else {**_genuine_batch(), "labels": [0, payload, 1, 2]}
    hostile = pickle.dumps(batch, protocol=2)
    folder = _cifar_root(tmp_path, data_batch_1=hostile)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(DataError, match=r"refused .*data_batch_1: it holds a reference to \w+\.\w+; a CIFAR-10 "
                                        r"batch holds only arrays, lists and strings.*re-extract"):
        CIFAR10(str(tmp_path), "train")
    assert not marker.exists() and sorted(tmp_path.rglob("*")) == before
    assert (folder / "data_batch_1").read_bytes() == hostile
    pickle.loads(hostile)  # the same file through plain pickle: the attack is real
    assert marker.exists()


def test_a_hostile_cifar_batch_stops_training_with_exit_code_2(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _cifar_root(tmp_path, data_batch_1=pickle.dumps(_hostile_payloads(marker)["os.system"], protocol=2))
    work_dir = tmp_path / "work"
    code = train_main(["--config", str(DIGITS), f"work_dir={work_dir}", "trainer.progress_bar=false",
                       "data.train.type=CIFAR10", f"+data.train.root={tmp_path}", "model.in_channels=3"])
    err = capsys.readouterr().err
    assert code == 2 and "error: CIFAR10: refused" in err and "data_batch_1" in err and "posix.system" in err
    assert not marker.exists() and "Traceback" not in err


@pytest.mark.parametrize("content, problem", [
    (b"", "readable CIFAR-10 batch \\(EOFError.*truncated or damaged"),
    (b"garbage, not a pickle at all", "readable CIFAR-10 batch .*truncated or damaged"),
    ("truncated", "readable CIFAR-10 batch .*truncated or damaged"),
    (pickle.dumps([1, 2, 3], protocol=2), "CIFAR-10 batch: it holds a list, not a dict"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, protocol=2),
     "'data' is a float32 array of shape \\(2, 3072\\), not a uint8 array of N x 3072"),
    (pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, protocol=2), "'data' is a uint8 array"),
    (pickle.dumps({"labels": [0, 1]}, protocol=2), "'data' is None"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, protocol=2), "'labels' must be"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": ["0", 1]}, protocol=2), "'labels' must be"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, protocol=2), "2 images but 1 labels"),
], ids=["empty", "garbage", "truncated", "list", "float", "columns", "no_data", "label_10", "label_str", "lengths"])
def test_a_damaged_cifar_batch_is_a_data_error_naming_the_file(tmp_path, content, problem):
    if content == "truncated":
        content = _python2_pickle(_genuine_batch())[:5000]
    _cifar_root(tmp_path, test_batch=content)
    with pytest.raises(DataError, match=f"CIFAR10: .*test_batch is not a .*{problem}"):
        CIFAR10(str(tmp_path), "test")


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
