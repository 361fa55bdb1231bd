import numpy as np
import pytest
from PIL import Image

import mimbench.seg  # noqa: F401
from mimbench.seg.datasets import FASHION_MNIST_SEG_CLASSES, FASHION_MNIST_SEG_PALETTE


def _write_split(root, split, names, rng):
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / split / f"{name}.jpg")
        Image.fromarray(rng.integers(0, 11, (16, 16), dtype=np.uint8)).save(root / "annotations" / split / f"{name}.png")


def test_fashion_mnist_seg_dataset_lists_and_loads_samples(tmp_path):
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    init_default_scope("mmseg")  # pipeline names resolve as in mmseg configs (default_scope = "mmseg")
    rng = np.random.default_rng(0)
    _write_split(tmp_path, "training", ["b", "a", "c"], rng)
    _write_split(tmp_path, "validation", ["v"], rng)
    ds = DATASETS.build(
        dict(
            type="FashionMNISTSegDataset",
            data_root=str(tmp_path),
            data_prefix=dict(img_path="images/training", seg_map_path="annotations/training"),
            pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations")],
        )
    )
    assert len(ds) == 3
    assert [p.split("/")[-1] for p in (ds.get_data_info(i)["img_path"] for i in range(3))] == ["a.jpg", "b.jpg", "c.jpg"]
    assert ds.get_data_info(0)["seg_map_path"].endswith("annotations/training/a.png")
    assert ds.metainfo["classes"] == FASHION_MNIST_SEG_CLASSES
    assert len(FASHION_MNIST_SEG_CLASSES) == 11 and FASHION_MNIST_SEG_CLASSES[0] == "background"
    assert len(ds.metainfo["palette"]) == 11 and ds.metainfo["palette"] == FASHION_MNIST_SEG_PALETTE
    assert ds.reduce_zero_label is False
    sample = ds[0]
    labels = sample["gt_seg_map"]
    expected = np.array(Image.open(tmp_path / "annotations" / "training" / "a.png"))
    # label 0 is a real class: no reduce-zero-label shift to 255
    assert np.array_equal(labels, expected)
    val = DATASETS.build(
        dict(
            type="FashionMNISTSegDataset",
            data_root=str(tmp_path),
            data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
        )
    )
    assert len(val) == 1


def test_class_names_agree_with_the_data_package():
    data = pytest.importorskip("mimbench.data")
    if not hasattr(data, "FASHION_MNIST_CLASSES"):
        pytest.skip("mimbench.data has no FASHION_MNIST_CLASSES")
    assert tuple(data.FASHION_MNIST_CLASSES) == FASHION_MNIST_SEG_CLASSES[1:]
