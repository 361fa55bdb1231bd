"""Bad files in an ImageFolder tree: greyscale and CMYK converted to RGB, empty / truncated / non-image files
skipped, counted and listed in the run record; past data.max_bad_fraction the run refuses to start."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mimbench.data import build_dataset, image_folder, skipped_files
from mimbench.errors import MimbenchError

REPO = Path(__file__).resolve().parents[2]

BROKEN = {
    "a/empty.jpg": "empty file",
    "a/truncated.jpg": "truncated JPEG",
    "b/notes.jpg": "not an image",
    "b/truncated.png": "truncated PNG",
}


def _jpeg(arr, mode="RGB"):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(arr):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tree(root, good_per_class=8):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(good_per_class):
                (d / f"{i}.jpg").write_bytes(_jpeg(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)))
        # the harmless odd ones: greyscale PNG, CMYK JPEG
        (root / split / "a" / "grey.png").write_bytes(_png(rng.integers(0, 255, (40, 48), dtype=np.uint8)))
        (root / split / "b" / "cmyk.jpg").write_bytes(_jpeg(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8), "CMYK"))
    train = root / "train"
    whole = _jpeg(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    (train / "a" / "empty.jpg").write_bytes(b"")
    (train / "a" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (train / "b" / "notes.jpg").write_text("this is not an image\n")
    png = _png(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    (train / "b" / "truncated.png").write_bytes(png[: len(png) - 30])
    return root


def test_broken_files_are_skipped_and_odd_modes_converted(tmp_path, capsys):
    from torchvision import transforms as T

    root = _tree(tmp_path / "imgs")
    ds = image_folder(root, "train", transform=T.ToTensor(), max_bad_fraction=0.25)
    assert len(ds) == 2 * 8 + 2
    reasons = {s["file"]: s["reason"] for s in ds.skipped}
    assert reasons.keys() == BROKEN.keys()
    for name, why in BROKEN.items():
        assert why in reasons[name]
    assert "skipping 4 broken file(s) of 22" in capsys.readouterr().err
    paths = [p for p, _ in ds.samples]
    for odd in ("grey.png", "cmyk.jpg"):
        x, _ = ds[next(i for i, p in enumerate(paths) if p.endswith(odd))]
        assert x.shape == (3, 40, 48) and torch.isfinite(x).all()
    assert skipped_files(torch.utils.data.Subset(ds, range(3))) == ds.skipped
    assert image_folder(root, "val").skipped == []  # nothing broken there


def test_too_many_broken_files_refuse_the_run_naming_them(tmp_path):
    root = _tree(tmp_path / "imgs")
    with pytest.raises(MimbenchError, match=r"4 of 22 files .* more than the 0.1 % allowed: a/empty.jpg: empty file") as err:
        build_dataset(str(root), "train")  # default max_bad_fraction 0.001
    assert "data.max_bad_fraction" in err.value.fix
    with pytest.raises(MimbenchError, match="not a fraction"):
        build_dataset(str(root), "train", max_bad_fraction=2)


def test_skipped_files_are_listed_in_the_run_record(tmp_path):
    from mimbench.evals.knn import run_knn
    from mimbench.testing import write_tiny_encoder

    enc = write_tiny_encoder(tmp_path / "enc.safetensors")
    root = _tree(tmp_path / "imgs")
    record = run_knn(encoder=enc, config=REPO / "eval_configs" / "knn" / "dino_k20.py", data=str(root), out=tmp_path / "out",
                     overrides=["data.max_bad_fraction=0.2", "data.num_workers=0", "knn.k=3"])
    assert record["dataset"]["sizes"] == {"train": 18, "val": 18}
    assert sorted(s["file"] for s in record["dataset"]["skipped"]["train"]) == sorted(BROKEN)
    assert record["dataset"]["skipped"]["val"] == []
    on_disk = json.loads(next((tmp_path / "out").glob("knn-*.json")).read_text())
    assert on_disk["dataset"]["skipped"] == record["dataset"]["skipped"]
