"""Every writer goes through mimbench.atomic: a full disk or a read-only directory mid-write leaves the previous
file byte for byte, reports the failure, and leaves no temporary file; caches are rebuilt, never read, when
incomplete or stale."""
import errno
import json
import os
import tempfile
from functools import partial

import numpy as np
import pytest
import torch

from mimbench.errors import MimbenchError


def _encoder(path, seed):
    from mimbench.testing import write_tiny_encoder

    return write_tiny_encoder(path, seed=seed)


def _write_checkpoint(d, v):
    from mimbench.engine import save_checkpoint

    save_checkpoint(d / "checkpoint-latest.pt", {"epoch": v, "w": torch.full((4,), float(v))})
    return d / "checkpoint-latest.pt"


def _write_encoder(d, v):
    return _encoder(d / "encoder.safetensors", v)


def _write_record(d, v):
    from mimbench.results.records import new_record, write_record

    t = 1_700_000_000.0
    encoder = {"path": "enc.safetensors", "sha256": "ab" * 32, "arch": "vit-test/8", "technique": "mae", "epochs": 1.0}
    rec = new_record("linear", protocol={"name": "p", "sha256": "cd" * 32}, encoder=encoder,
                     dataset={"name": "builtin:fashion-mnist"}, metrics={"top1": float(v)}, seed=0, started=t,
                     finished=t + 1)
    rec["run_id"] = "0" * 32
    return write_record(d, rec)


def _write_backbone(d, v):
    from mimbench.seg.backbone import write_backbone_checkpoint

    enc = d / f"enc{v}.safetensors"
    if not enc.exists():  # the source is there before the fault; only the backbone write may fail
        _encoder(enc, v)
    return write_backbone_checkpoint(enc, d / "backbone_init.pth", 32)[0]


def _write_text(d, v):
    from mimbench.atomic import atomic_write_text

    return atomic_write_text(d / "config.py", f"version = {v}\n", what="the resolved config", fix="Use another --out.")


WRITERS = {"training checkpoint": _write_checkpoint, "encoder file": _write_encoder, "run record": _write_record,
           "segmentation backbone checkpoint": _write_backbone, "resolved config": _write_text}


def _disk_full(monkeypatch):
    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", fsync)
    return "No space left on device"


def _read_only(monkeypatch):
    def mkstemp(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return "Read-only file system"


FAULTS = {"disk full": _disk_full, "read-only directory": _read_only}


@pytest.mark.parametrize("fault", sorted(FAULTS))
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch, writer, fault):
    write = WRITERS[writer]
    path = write(tmp_path, 1)
    before = path.read_bytes()
    listing = sorted(p.name for p in tmp_path.iterdir())
    if writer == "segmentation backbone checkpoint":
        _encoder(tmp_path / "enc2.safetensors", 2)  # the new source exists; only the target write fails
        listing = sorted(p.name for p in tmp_path.iterdir())
    message = FAULTS[fault](monkeypatch)
    with pytest.raises(MimbenchError, match=message) as err:
        write(tmp_path, 2)
    monkeypatch.undo()
    assert str(path) in str(err.value) and err.value.fix
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no temporary file left behind
    assert write(tmp_path, 2).read_bytes() != before  # and the writer works once the fault is gone


# ---------------------------------------------------------------------------------------------- feature cache
def _folder(root, n=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def test_feature_cache_is_rebuilt_when_incomplete_stale_or_damaged(tmp_path, monkeypatch):
    from PIL import Image

    from mimbench.evals import features as F

    enc = _encoder(tmp_path / "enc.safetensors", 0)
    data = str(_folder(tmp_path / "imgs"))
    cache = tmp_path / "cache"
    calls = {"n": 0}
    real = F.compute_features

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(F, "compute_features", counting)
    run = partial(F.extract_features, enc, data, "train", cache_dir=cache, img_size=32)
    feats, labels, info = run()
    assert not info["cached"] and calls["n"] == 1
    key = info["key"]
    manifest = cache / f"{key}.manifest.json"
    fpath = cache / f"{key}.features.npy"
    assert json.loads(manifest.read_text())["features"]["shape"] == [6, 32]
    assert run()[2]["cached"] and calls["n"] == 1  # complete and current: read back

    manifest.unlink()  # killed before the manifest was written: incomplete, never read
    assert not run()[2]["cached"] and calls["n"] == 2
    fpath.write_bytes(fpath.read_bytes()[:-16])  # truncated after the fact
    assert not run()[2]["cached"] and calls["n"] == 3
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "imgs" / "train" / "a" / "0.png")  # replaced
    again = run()
    assert not again[2]["cached"] and calls["n"] == 4 and again[2]["key"] == key
    np.save(fpath, np.array([object()], dtype=object), allow_pickle=True)  # an object array (pickle) planted
    assert not run()[2]["cached"] and calls["n"] == 5
    np.testing.assert_array_equal(run()[0], again[0])

    # a failed rewrite reports the failure and leaves no entry that could be read as complete
    manifest.unlink()
    _disk_full(monkeypatch)
    with pytest.raises(MimbenchError, match="No space left"):
        run()
    monkeypatch.undo()
    assert not manifest.exists()
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- segmentation set
def test_segmentation_set_interrupted_or_damaged_is_rebuilt(tmp_path, monkeypatch):
    from PIL import Image

    from mimbench.data.seg import MANIFEST, build_fashion_mnist_seg

    root = tmp_path / "fmseg"
    build_fashion_mnist_seg(root, n_train=4, n_val=2)
    files = json.loads((root / MANIFEST).read_text())["files"]
    assert len(files) == 12 and all(size > 0 for size in files.values())

    real_save, calls = Image.Image.save, {"n": 0}

    def full_disk_midway(self, fp, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # the fifth file: half written, then the disk is full
            with open(fp, "wb") as fh:
                fh.write(b"\xff\xd8\xff")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", full_disk_midway)
    with pytest.raises(MimbenchError, match="No space left"):
        build_fashion_mnist_seg(root, n_train=3, n_val=2)
    monkeypatch.undo()
    assert not (root / MANIFEST).exists()  # never taken for a complete set
    assert not list(root.rglob("*.tmp"))
    build_fashion_mnist_seg(root, n_train=3, n_val=2)
    stamp = (root / MANIFEST).stat().st_mtime_ns
    victim = root / "images" / "training" / "fmseg_00001.jpg"
    victim.write_bytes(victim.read_bytes()[:20])  # truncated behind the manifest's back
    build_fashion_mnist_seg(root, n_train=3, n_val=2)
    assert (root / MANIFEST).stat().st_mtime_ns != stamp and victim.stat().st_size == \
        json.loads((root / MANIFEST).read_text())["files"]["images/training/fmseg_00001.jpg"]


def test_atomic_files_get_the_permissions_of_a_plain_write(tmp_path):
    from mimbench.atomic import atomic_write_text

    umask = os.umask(0o022)
    try:
        new = atomic_write_text(tmp_path / "new.txt", "a", what="a file", fix="-")
        assert (new.stat().st_mode & 0o777) == 0o644  # not mkstemp's 0600: others on a cluster can read results
        os.chmod(new, 0o640)
        atomic_write_text(new, "b", what="a file", fix="-")
        assert (new.stat().st_mode & 0o777) == 0o640 and new.read_text() == "b"  # a replaced file keeps its mode
    finally:
        os.umask(umask)
