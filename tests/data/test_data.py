"""The embedded Fashion-MNIST subset, FashionMNIST-Seg and the folder layout checks."""
import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimbench.data import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, build_dataset, check_imagefolder, dataset_stats,
                           image_folder)
from mimbench.data.builtin import SUBSET_FILE
from mimbench.data.seg import FOREGROUND_THRESHOLD, build_fashion_mnist_seg, check_ade20k_layout
from mimbench.errors import MimbenchError

REPO = Path(__file__).resolve().parents[2]


def test_subset_is_class_balanced_and_small():
    assert SUBSET_FILE.stat().st_size <= 8 * 2**20
    for split, per_class in (("train", 1200), ("val", 200)):
        ds = build_dataset("builtin:fashion-mnist", split)
        assert len(ds.classes) == 10
        assert np.bincount(np.array(ds.targets), minlength=10).tolist() == [per_class] * 10


def test_stats_constants_match_the_data():
    ds = build_dataset("builtin:fashion-mnist", "train")
    x = ds.images.double() / 255
    assert abs(x.mean().item() - FASHION_MNIST_MEAN[0]) < 5e-4
    assert abs(x.std().item() - FASHION_MNIST_STD[0]) < 5e-4
    # normalised at 28 (no padding): zero mean, unit std
    ds28 = build_dataset("builtin:fashion-mnist", "train", img_size=28)
    batch = torch.stack([ds28[i][0] for i in range(0, 12000, 6)])
    assert abs(batch.mean().item()) < 0.05 and abs(batch.std().item() - 1) < 0.05


def test_default_items_are_padded_three_channel_tensors():
    ds = build_dataset("builtin:fashion-mnist", "val")
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    background = -FASHION_MNIST_MEAN[0] / FASHION_MNIST_STD[0]
    assert torch.allclose(x[:, :2, :], torch.full_like(x[:, :2, :], background))  # the 2-pixel zero padding
    inner = x[0, 2:30, 2:30] * FASHION_MNIST_STD[0] + FASHION_MNIST_MEAN[0]
    assert torch.allclose(inner, ds.images[3].float() / 255, atol=1e-5)  # garment pixels exact
    assert build_dataset("builtin:fashion-mnist", "val", img_size=48)[0][0].shape == (3, 48, 48)


def test_user_transform_gets_a_pil_rgb_image():
    seen = []

    def transform(img):
        seen.append((img.mode, img.size))
        return torch.zeros(1)

    ds = build_dataset("builtin:fashion-mnist", "train", transform=transform)
    ds[0]
    assert seen == [("RGB", (28, 28))]


def test_unknown_builtin_and_split_are_clear_errors():
    with pytest.raises(MimbenchError, match="builtin:fashion-mnist"):
        build_dataset("builtin:cifar", "train")
    with pytest.raises(MimbenchError, match="split"):
        build_dataset("builtin:fashion-mnist", "test")
    assert dataset_stats("/some/imagenet")[0] == (0.485, 0.456, 0.406)


def _make_folder(root: Path, classes=("a", "b")):
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(d / "x.JPEG")


def test_imagefolder_layout_errors_name_the_path(tmp_path):
    with pytest.raises(MimbenchError, match="does not exist"):
        build_dataset(str(tmp_path / "nope"), "train")
    (tmp_path / "root").mkdir()
    with pytest.raises(MimbenchError, match="no 'train' folder"):
        check_imagefolder(tmp_path / "root", "train")
    (tmp_path / "root" / "train").mkdir()
    with pytest.raises(MimbenchError, match="no class folders"):
        check_imagefolder(tmp_path / "root", "train")
    (tmp_path / "root" / "train" / "cat").mkdir()
    with pytest.raises(MimbenchError, match="cat holds no images"):
        check_imagefolder(tmp_path / "root", "train")


def test_imagefolder_splits_must_hold_the_same_classes(tmp_path):
    from PIL import Image

    root = tmp_path / "root"
    for split, classes in (("train", ("n01", "n02", "n03")), ("val", ("n01", "n03"))):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / c / "a.JPEG")
    assert check_imagefolder(root, "train") == root / "train"
    with pytest.raises(MimbenchError, match="not in val: n02") as err:
        check_imagefolder(root, "val")
    assert "would not match" in err.value.problem
    (root / "val" / "n02").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "n02" / "a.JPEG")
    assert check_imagefolder(root, "val") == root / "val"


def test_imagefolder_reads_and_names_corrupt_images(tmp_path):
    _make_folder(tmp_path)
    ds = image_folder(tmp_path, "train")
    assert ds.classes == ["a", "b"] and ds[0][0].size == (8, 8)
    (tmp_path / "train" / "a" / "x.JPEG").write_bytes(b"not an image")
    with pytest.raises(MimbenchError, match=r"x\.JPEG"):
        ds[0]


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_seg_set_is_deterministic_and_idempotent(tmp_path):
    a = build_fashion_mnist_seg(tmp_path / "a", n_train=6, n_val=3)
    b = build_fashion_mnist_seg(tmp_path / "b", n_train=6, n_val=3)
    assert _digest(a) == _digest(b)
    stamp = (a / "images" / "training" / "fmseg_00000.jpg").stat().st_mtime_ns
    build_fashion_mnist_seg(a, n_train=6, n_val=3)  # same parameters: nothing rewritten
    assert (a / "images" / "training" / "fmseg_00000.jpg").stat().st_mtime_ns == stamp
    build_fashion_mnist_seg(a, n_train=4, n_val=3)  # different parameters: rebuilt
    assert len(list((a / "images" / "training").iterdir())) == 4
    assert check_ade20k_layout(a) == a


def test_seg_labels_agree_with_garment_pixels(tmp_path):
    root = build_fashion_mnist_seg(tmp_path / "s", n_train=8, n_val=2)
    for ann_path in sorted((root / "annotations" / "training").iterdir()):
        ann = np.array(Image.open(ann_path))
        img = np.array(Image.open(root / "images" / "training" / ann_path.with_suffix(".jpg").name).convert("L"))
        assert ann.dtype == np.uint8 and ann.max() <= 10 and (ann > 0).any() and (ann == 0).any()
        # JPEG is lossy: compare away from the threshold
        assert (img[ann == 0] < FOREGROUND_THRESHOLD + 25).mean() > 0.97
        assert (img[ann > 0] > FOREGROUND_THRESHOLD - 25).mean() > 0.97


def test_seg_set_default_layout_is_one_garment_at_encoder_resolution(tmp_path):
    # 32x32 canvases (the built-in encoders' pre-training size), one garment each: one class per map
    root = build_fashion_mnist_seg(tmp_path / "s", n_train=12, n_val=2)
    for ann_path in (root / "annotations" / "training").iterdir():
        ann = np.array(Image.open(ann_path))
        assert ann.shape == (32, 32) and len(set(np.unique(ann)) - {0}) == 1
    several = build_fashion_mnist_seg(tmp_path / "m", n_train=12, n_val=2, canvas=64, garments=(3, 4))
    classes = [len(set(np.unique(np.array(Image.open(p)))) - {0})
               for p in (several / "annotations" / "training").iterdir()]
    assert max(classes) >= 2
    with pytest.raises(MimbenchError, match="garments"):
        build_fashion_mnist_seg(tmp_path / "bad", garments=(0, 2))
    with pytest.raises(MimbenchError, match="scale"):
        build_fashion_mnist_seg(tmp_path / "bad", scale=(1.5, 1.0))


def test_ade20k_layout_errors(tmp_path):
    with pytest.raises(MimbenchError, match="does not exist"):
        check_ade20k_layout(tmp_path / "ADEChallengeData2016")
    root = build_fashion_mnist_seg(tmp_path / "s", n_train=3, n_val=2)
    (root / "annotations" / "validation" / "fmseg_00000.png").unlink()
    with pytest.raises(MimbenchError, match="2 images but 1 annotations"):
        check_ade20k_layout(root)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(MimbenchError, match="annotations"):
        check_ade20k_layout(tmp_path / "empty")


def _write_idx(path: Path, arr: np.ndarray):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_build_script_balances_classes_and_reports_missing_files(tmp_path):
    script = REPO / "scripts" / "build_fashion_mnist_subset.py"
    res = subprocess.run([sys.executable, str(script), "--src", str(tmp_path / "none"), "--out", str(tmp_path / "o.npz")],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "apt-get install dataset-fashion-mnist" in res.stderr
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 12500), ("t10k", 2100)):
        labels = np.arange(n) % 10
        _write_idx(src / f"{name}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(src / f"{name}-labels-idx1-ubyte.gz", labels)
    res = subprocess.run([sys.executable, str(script), "--src", str(src), "--out", str(tmp_path / "o.npz")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    with np.load(tmp_path / "o.npz") as d:
        assert np.bincount(d["train_labels"]).tolist() == [1200] * 10
        assert np.bincount(d["val_labels"]).tolist() == [200] * 10
