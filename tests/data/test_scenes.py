import json
import logging
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from PIL import Image

from hat.data.datasets import FASHION_MNIST_ROOT, DigitsDataset
from hat.data.scenes import ensure_scenes, main, make_scenes
from hat.errors import DataError

TINY = dict(num_train=6, num_val=4)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes") / "digits", **TINY)


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_layout_and_settings_file(scenes):
    files = _files(scenes)
    assert {"train/000001.png", "train/000006.png", "val/000004.png", "annotations/instances_train.json",
            "annotations/instances_val.json", "scenes.json"} <= set(files)
    assert len([f for f in files if f.endswith(".png")]) == 10
    assert json.loads(files["scenes.json"])["num_train"] == 6
    coco = _coco(scenes, "val")
    assert [c["name"] for c in coco["categories"]] == [str(d) for d in range(10)]
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
    assert [i["file_name"] for i in coco["images"]] == [f"{i:06d}.png" for i in range(1, 5)]
    assert not list(scenes.parent.glob(".*"))  # no temporary folder left behind


def test_same_seed_same_bytes_other_seed_differs(scenes, tmp_path):
    assert _files(make_scenes(tmp_path / "again", **TINY)) == _files(scenes)
    assert _files(make_scenes(tmp_path / "other", **TINY, seed=1)) != _files(scenes)


@pytest.mark.parametrize("split", ["train", "val"])
def test_boxes_and_masks_match_the_pixels(scenes, split):
    coco = _coco(scenes, split)
    assert coco["annotations"]
    for info in coco["images"]:
        pixels = np.asarray(Image.open(scenes / split / info["file_name"]))
        assert pixels.shape == (info["height"], info["width"]) == (64, 64)
        ink = pixels / 255.0 > 0.25
        covered = np.zeros_like(ink)
        anns = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
        assert 1 <= len(anns) <= 4
        for ann in anns:
            x, y, w, h = ann["bbox"]
            mask = mask_utils.decode({"size": ann["segmentation"]["size"],
                                      "counts": ann["segmentation"]["counts"].encode()})
            assert mask.shape == (64, 64) and ann["area"] == mask.sum() > 0 and ann["iscrowd"] == 0
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert [cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]] == [x, y, w, h]
            assert np.array_equal(mask[y:y + h, x:x + w].astype(bool), ink[y:y + h, x:x + w])
            assert 1 <= ann["category_id"] <= 10
            covered[y:y + h, x:x + w] = True
        assert not pixels[~covered].any()  # no ink outside the objects' boxes
        for a, b in combinations([a["bbox"] for a in anns], 2):
            assert a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1]


def test_train_scenes_use_only_train_digits(scenes):
    from sklearn.datasets import load_digits

    target = load_digits().target
    for split in ("train", "val"):
        allowed = set(DigitsDataset(split).indices.tolist())
        anns = _coco(scenes, split)["annotations"]
        assert {a["source_index"] for a in anns} <= allowed
        assert all(a["category_id"] == target[a["source_index"]] + 1 for a in anns)


def test_ensure_scenes_generates_reuses_and_refuses_other_settings(tmp_path, caplog):
    root = tmp_path / "s"
    with caplog.at_level(logging.INFO, logger="hat"):
        assert ensure_scenes(root, **TINY) == root
    assert "generating digits scenes" in caplog.text and str(root) in caplog.text
    stamp = (root / "scenes.json").stat().st_mtime_ns
    ensure_scenes(root, **TINY)
    assert (root / "scenes.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match=r"other settings: .*seed=0 \(wanted 3\).*delete the folder"):
        ensure_scenes(root, **TINY, seed=3)
    with pytest.raises(DataError, match="unknown key"):
        ensure_scenes(root, num_images=3)


def test_make_scenes_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    (tmp_path / "empty").mkdir()
    make_scenes(tmp_path / "empty", **TINY)  # an empty folder is fine
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not empty.*overwrite"):
        make_scenes(tmp_path / "busy", **TINY)
    make_scenes(tmp_path / "busy", **TINY, overwrite=True)
    assert not (tmp_path / "busy" / "notes.txt").exists() and (tmp_path / "busy" / "scenes.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty"]


@pytest.mark.parametrize("bad, match", [(dict(source="cifar"), "source must be one of"),
                                        (dict(min_size=30), "min_size <= max_size"),
                                        (dict(num_train=0), "num_train must be an integer >= 1")])
def test_bad_settings_are_data_errors(tmp_path, bad, match):
    with pytest.raises(DataError, match=match):
        make_scenes(tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


def test_main_writes_and_reports(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--source", "digits", "--out", str(out), "--num-train", "3", "--num-val", "2", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'train'}: 3 images" in printed and "objects" in printed
    assert json.loads((out / "scenes.json").read_text())["seed"] == 5
    assert main(["--out", str(out), "--num-train", "3"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_main_bad_argument_is_one_error_line(tmp_path, capsys):
    assert main(["--source", "cifar", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cifar" in err and err.count("\n") == 1


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed")
def test_fashion_mnist_scenes(tmp_path):
    root = make_scenes(tmp_path / "f", source="fashion_mnist", num_train=2, num_val=2)
    coco = _coco(root, "val")
    assert coco["categories"][0]["name"] == "T-shirt/top" and coco["categories"][9]["name"] == "Ankle boot"
    assert json.loads((root / "scenes.json").read_text())["source_root"] == FASHION_MNIST_ROOT
    assert all(a["source_index"] < 10000 for a in coco["annotations"])


def test_missing_fashion_files_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="not found under data root"):
        make_scenes(tmp_path / "f", source="fashion_mnist", source_root=str(tmp_path), **TINY)
    assert not (tmp_path / "f").exists() and not list(tmp_path.glob(".*"))


def test_a_folder_written_meanwhile_is_kept_and_dead_temps_removed(tmp_path, monkeypatch):
    import hat.data.scenes as scenes_module
    from hat.fileio import _host

    out, real_write, raced = tmp_path / "race", scenes_module._write_json, []
    dead = tmp_path / f".race.{_host()}-999999999.x1y2{scenes_module.TEMP_SUFFIX}"
    dead.mkdir()

    def write_then_race(path, obj, indent=None):
        real_write(path, obj, indent)
        if path.name == "scenes.json" and not raced:
            raced.append(True)
            make_scenes(out, **TINY, seed=7)  # another process finishes first

    monkeypatch.setattr(scenes_module, "_write_json", write_then_race)
    assert make_scenes(out, **TINY) == out
    assert json.loads((out / "scenes.json").read_text())["seed"] == 7  # the first copy stays
    assert [p.name for p in tmp_path.iterdir()] == ["race"]  # both temporary folders are gone


def test_the_tool_runs_as_users_call_it(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "scenes"
    done = subprocess.run([sys.executable, "tools/make_scenes.py", "--source", "digits", "--out", str(out),
                           "--num-train", "2", "--num-val", "1"], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (out / "annotations" / "instances_val.json").is_file() and len(list((out / "train").iterdir())) == 2
