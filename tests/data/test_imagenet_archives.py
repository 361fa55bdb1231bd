"""``mimbench data imagenet``: small archives of the official structure (a devkit with meta.mat and the ground
truth, a train tar of per-class tars, a flat val tar) built here, turned into the tree, resumed, refused when
bad, and evaluated."""
from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image
from typer.testing import CliRunner

from mimbench.cli import app
from mimbench.data import check_imagefolder
from mimbench.data import imagenet
from mimbench.errors import MimbenchError

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
WNIDS = ("n01440764", "n01443537", "n01484850")  # the first three ILSVRC2012 synsets
TRAIN_PER_CLASS = (5, 4, 6)
# ground truth: the 1-based ILSVRC2012_ID of each validation image, in file order (two per class, shuffled)
VAL_IDS = (2, 1, 3, 3, 1, 2)


def _jpeg(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _meta_mat(path: Path) -> None:
    """meta.mat as the devkit has it: a struct array ``synsets`` (leaf synsets with their 1-based
    ILSVRC2012_ID first, then inner nodes of the hierarchy with num_children > 0, which torchvision skips)."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(i + 1, w, f"class {w}, synonym {i}", "a gloss", 0, np.zeros((1, 0)), 0, n)
            for i, (w, n) in enumerate(zip(WNIDS, TRAIN_PER_CLASS))]
    rows.append((1001, "n00001740", "entity", "the root", 3, np.array([[1, 2, 3]]), 19, 0))
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        synsets[i, 0] = tuple(np.array([[v]]) if isinstance(v, int) else v for v in row)
    scipy.io.savemat(str(path), {"synsets": synsets})


def make_archives(folder: Path, val_ids=VAL_IDS) -> Path:
    """The three archives under their official names, of the official structure, with tiny JPEGs."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    devkit = folder / "devkit-src" / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    _meta_mat(devkit / "meta.mat")
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in val_ids))
    with tarfile.open(folder / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        tar.add(devkit.parent, arcname="ILSVRC2012_devkit_t12")
    with tarfile.open(folder / "ILSVRC2012_img_train.tar", "w") as train:
        for wnid, n in zip(WNIDS, TRAIN_PER_CLASS):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as cls:
                for k in range(n):
                    _add(cls, f"{wnid}_{k + 1}.JPEG", _jpeg(rng))
            _add(train, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(folder / "ILSVRC2012_img_val.tar", "w") as val:
        for k in range(len(val_ids)):
            _add(val, f"ILSVRC2012_val_{k + 1:08d}.JPEG", _jpeg(rng))
    return folder


def _cut_in_last_member(path: Path) -> None:
    """An interrupted download: the file ends inside its last member's data."""
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    os.truncate(path, last.offset_data + last.size // 2)


def build(archives: Path, tree: Path, *extra: str):
    return runner.invoke(app, ["data", "imagenet", "--archives", str(archives), "--out", str(tree), *extra])


def _snapshot(tree: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(tree)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for split in ("train", "val") for p in sorted((tree / split).rglob("*.JPEG"))}


@pytest.fixture
def counted(monkeypatch):
    """Counts the extractions: class tars (torchvision's extract_archive) and the val archive."""
    calls = {"class": 0, "val": 0}
    extract, parse_val = imagenet.extract_archive, imagenet.parse_val_archive

    def count_extract(*args, **kwargs):
        calls["class"] += 1
        return extract(*args, **kwargs)

    def count_val(*args, **kwargs):
        calls["val"] += 1
        return parse_val(*args, **kwargs)

    monkeypatch.setattr(imagenet, "extract_archive", count_extract)
    monkeypatch.setattr(imagenet, "parse_val_archive", count_val)
    return calls


def test_builds_the_tree_from_the_archives_and_resumes_without_extracting_again(tmp_path, counted):
    archives, tree = make_archives(tmp_path / "dl"), tmp_path / "imagenet"
    result = build(archives, tree, "--custom-archives")
    assert result.exit_code == 0, result.output
    assert "15 train / 6 val images, 3 classes - not the full ImageNet-1k" in result.output
    assert counted == {"class": 3, "val": 1}
    for wnid, n in zip(WNIDS, TRAIN_PER_CLASS):
        assert sorted(p.name for p in (tree / "train" / wnid).iterdir()) == [f"{wnid}_{k + 1}.JPEG" for k in range(n)]
    # each validation image in the class its ground-truth line names
    for k, synset in enumerate(VAL_IDS):
        assert (tree / "val" / WNIDS[synset - 1] / f"ILSVRC2012_val_{k + 1:08d}.JPEG").is_file()
    assert sorted(p.name for p in (tree / "val").iterdir()) == list(WNIDS)
    assert check_imagefolder(tree, "val") == tree / "val" and check_imagefolder(tree, "train") == tree / "train"

    before = _snapshot(tree)
    again = build(archives, tree, "--custom-archives")
    assert again.exit_code == 0, again.output
    assert "15 train / 6 val images, 3 classes" in again.output
    assert counted == {"class": 3, "val": 1}  # nothing extracted the second time
    assert _snapshot(tree) == before  # the same files, untouched


def test_an_interrupted_extraction_is_redone_and_finished_classes_are_kept(tmp_path, counted, monkeypatch):
    archives, tree = make_archives(tmp_path / "dl"), tmp_path / "imagenet"
    extract = imagenet.extract_archive

    def crash_on_second(src, dst, remove_finished=False):
        extract(src, dst, remove_finished=remove_finished)
        if counted["class"] == 2:  # the second class is on disk (staged), not yet moved and marked
            raise KeyboardInterrupt

    monkeypatch.setattr(imagenet, "extract_archive", crash_on_second)
    assert build(archives, tree, "--custom-archives").exit_code == 130  # Ctrl-C, as click reports it
    assert sorted(p.name for p in (tree / "train").iterdir()) == [WNIDS[0]]
    assert (tree / imagenet.STATE / "partial" / "train" / WNIDS[1]).is_dir()  # staged, never moved in
    first = _snapshot(tree)
    # a class folder that reached the tree but lost its marker (killed between the two) is not trusted
    (tree / imagenet.STATE / "train" / f"{WNIDS[0]}.done").unlink()
    (tree / "train" / WNIDS[0] / f"{WNIDS[0]}_1.JPEG").unlink()
    monkeypatch.setattr(imagenet, "extract_archive", extract)
    counted["class"] = 0
    result = build(archives, tree, "--custom-archives")
    assert result.exit_code == 0, result.output
    assert counted["class"] == 3  # the unmarked first class and the two never finished
    assert len(list((tree / "train" / WNIDS[0]).iterdir())) == TRAIN_PER_CLASS[0]
    assert set(first) <= set(_snapshot(tree)) | {f"train/{WNIDS[0]}/{WNIDS[0]}_1.JPEG"}
    assert not (tree / imagenet.STATE / "partial").exists()
    counted["class"] = 0
    (tree / imagenet.STATE / "train" / f"{WNIDS[1]}.done").unlink()  # only this class is redone
    assert build(archives, tree, "--custom-archives").exit_code == 0 and counted["class"] == 1


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "ILSVRC2012_img_val.tar").unlink(), r"lacks ILSVRC2012_img_val\.tar"),
    (lambda d: (d / "ILSVRC2012_img_train.tar").rename(d / "ILSVRC2012_img_train (1).tar"),
     r"lacks ILSVRC2012_img_train\.tar \(archives there: .*ILSVRC2012_img_train \(1\)\.tar"),
    (lambda d: _cut_in_last_member(d / "ILSVRC2012_img_train.tar"), r"ILSVRC2012_img_train\.tar is incomplete"),
    (lambda d: os.truncate(d / "ILSVRC2012_img_val.tar", 3000), r"ILSVRC2012_img_val\.tar is incomplete or damaged"),
    (lambda d: (d / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(b"not a tar"), r"not a readable tar archive"),
    (lambda d: make_archives(d / "other", val_ids=VAL_IDS[:4]).joinpath("ILSVRC2012_devkit_t12.tar.gz")
     .replace(d / "ILSVRC2012_devkit_t12.tar.gz"), r"holds 6 images and the devkit's ground truth labels 4"),
])
def test_bad_archives_are_refused_before_any_work(tmp_path, counted, damage, message):
    archives, tree = make_archives(tmp_path / "dl"), tmp_path / "imagenet"
    damage(archives)
    result = build(archives, tree, "--custom-archives")
    assert result.exit_code == 2, result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert "Traceback" not in result.output
    assert counted == {"class": 0, "val": 0} and not tree.exists()


def test_archives_that_are_not_the_official_files_need_custom_archives(tmp_path, counted):
    archives, tree = make_archives(tmp_path / "dl"), tmp_path / "imagenet"
    result = build(archives, tree)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "ILSVRC2012_img_train.tar is" in text and "the official file 147,897,477,120" in text
    assert "ILSVRC2012_devkit_t12.tar.gz does not have the official MD5 sum" in text
    assert "--custom-archives" in text and counted == {"class": 0, "val": 0} and not tree.exists()


def test_a_tree_this_command_did_not_write_is_left_alone(tmp_path):
    archives, tree = make_archives(tmp_path / "dl"), tmp_path / "imagenet"
    (tree / "val").mkdir(parents=True)
    result = build(archives, tree, "--custom-archives")
    assert result.exit_code == 2 and "not written by this command" in result.output


def test_md5_sums_are_checked_once_and_remembered(tmp_path, monkeypatch):
    archives = make_archives(tmp_path / "dl")
    paths = imagenet.find_archives(archives)
    sums = {part: hashlib.md5(p.read_bytes()).hexdigest() for part, p in paths.items()}
    monkeypatch.setattr(imagenet, "OFFICIAL_MD5", sums)
    state = tmp_path / "state"
    imagenet.verify_md5(paths, state)
    assert len(list(state.glob("md5-*.ok"))) == 2  # the two image archives (the devkit's is checked with the sizes)
    monkeypatch.setattr(imagenet, "_file_md5", lambda path: pytest.fail(f"{path} hashed again"))
    imagenet.verify_md5(paths, state)  # remembered: no second hash
    monkeypatch.setattr(imagenet, "OFFICIAL_MD5", {**sums, "val": "0" * 32})
    monkeypatch.setattr(imagenet, "_file_md5", lambda path: hashlib.md5(path.read_bytes()).hexdigest())
    with pytest.raises(MimbenchError, match="ILSVRC2012_img_val.tar has the official size but not the official MD5"):
        imagenet.verify_md5(paths, state)


def test_data_imagenet_help_has_an_example():
    result = runner.invoke(app, ["data", "imagenet", "--help"])
    assert result.exit_code == 0 and "Example: mimbench data imagenet" in result.output


def test_the_summary_says_whether_the_tree_is_the_full_imagenet():
    full = imagenet.format_summary({**imagenet.FULL_COUNTS, "full": True, "tree": "T"})
    assert "1,281,167 train / 50,000 val images, 1,000 classes - the full ImageNet-1k" in full
    subset = imagenet.format_summary({"train": 15, "val": 6, "classes": 3, "full": False, "tree": "T"})
    assert "not the full ImageNet-1k" in subset


def test_an_evaluation_runs_on_the_built_tree_and_a_flat_val_names_this_command(tmp_path, tiny_encoder):
    archives, tree = make_archives(tmp_path / "dl"), tmp_path / "imagenet"
    assert build(archives, tree, "--custom-archives").exit_code == 0
    argv = ["eval", "knn", "--encoder", str(tiny_encoder), "--config", str(REPO / "eval_configs/knn/dino_k20.py"),
            "--data", str(tree), "--out", str(tmp_path / "knn"), "--set", "data.num_workers=0", "--set", "knn.k=3"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert re.search(r"knn: .*top1=", result.output)
    for image in list((tree / "val").rglob("*.JPEG")):  # the val archive as it comes, unsorted
        image.rename(tree / "val" / image.name)
    for folder in (tree / "val").iterdir():
        if folder.is_dir():
            folder.rmdir()
    flat = runner.invoke(app, argv[:-4] + ["--out", str(tmp_path / "knn2")] + argv[-4:])
    assert flat.exit_code == 2
    assert "mimbench data imagenet --archives DIR --out TREE" in " ".join(flat.output.split())


def test_official_archives_are_checked_by_size_and_md5_then_built(tmp_path, monkeypatch):
    """The default path (no --custom-archives), with the official sizes and sums replaced by these archives'."""
    archives, tree = make_archives(tmp_path / "dl"), tmp_path / "imagenet"
    paths = imagenet.find_archives(archives)
    monkeypatch.setattr(imagenet, "OFFICIAL_SIZES", {part: paths[part].stat().st_size for part in ("train", "val")})
    sums = {part: hashlib.md5(path.read_bytes()).hexdigest() for part, path in paths.items()}
    monkeypatch.setattr(imagenet, "OFFICIAL_MD5", sums)
    result = build(archives, tree)
    assert result.exit_code == 0, result.output
    assert "15 train / 6 val images, 3 classes" in result.output
    assert sorted(p.name for p in (tree / imagenet.STATE).glob("md5-*.ok")) == [
        "md5-ILSVRC2012_img_train.tar.ok", "md5-ILSVRC2012_img_val.tar.ok"]
    with open(paths["val"], "r+b") as fh:  # same size, one byte changed: a damaged download
        fh.seek(600)
        byte = fh.read(1)
        fh.seek(600)
        fh.write(bytes([byte[0] ^ 0xFF]))
    damaged = build(archives, tmp_path / "other")
    assert damaged.exit_code == 2 and "has the official size but not the official MD5 sum" in damaged.output
