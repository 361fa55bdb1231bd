"""ImageNet-1k from its official archives to the folder tree every evaluation reads (``mimbench data imagenet``).

Input: a folder holding the three files image-net.org distributes, under their own names::

    ILSVRC2012_img_train.tar      1,000 per-class tars (n01440764.tar, ...), 1,281,167 images
    ILSVRC2012_img_val.tar        50,000 images in one flat folder (ILSVRC2012_val_00000001.JPEG, ...)
    ILSVRC2012_devkit_t12.tar.gz  data/meta.mat (the synsets) and data/ILSVRC2012_validation_ground_truth.txt

Output: ``TREE/train/<wnid>/*.JPEG`` and ``TREE/val/<wnid>/*.JPEG`` (:data:`mimbench.data.folders.LAYOUT`).
The parsing is torchvision's own (``torchvision.datasets.imagenet``): ``parse_devkit_archive`` reads the
synsets and the validation labels, ``parse_val_archive`` sorts the validation images into class folders, and
each class tar of the train archive is extracted with ``extract_archive`` into a folder named after it, the
step ``parse_train_archive`` repeats for all 1,000 - here one class at a time, so that the work can resume.

**Checks before any work starts.** Each archive must be present under its official name. By default the
archives must be the official files: the two image archives of the official sizes (a different size is an
incomplete download) and the devkit of torchvision's MD5 sum (computed in a moment), then the image archives'
MD5 sums (torchvision's, about 5-15 minutes for the 138 GB train archive at disk speed; a verified sum is
remembered in the tree, so a resumed run does not hash again; ``--no-md5`` skips these two).
``--custom-archives`` accepts archives of the same structure that are not the official files (a subset,
the test suite's small archives): sizes and MD5 sums are then not checked. In both cases the archives must
be whole (every member within the file) and consistent: the val archive holds one file per ground-truth
line, and the train archive's classes are the validation classes of the devkit. Free disk space must hold
what remains to extract.

**Resume.** A class is extracted into ``TREE/.mimbench-imagenet/partial/``, moved into ``TREE/train`` and
then marked complete (a marker file holding its image count, written last); a class without its marker is
removed and extracted again, never trusted. The validation split is done the same way, as one unit.

**End.** The images on disk are counted against what the archives hold (train: the class tars' members;
val: the devkit's ground truth; classes: the devkit's validation classes), and the summary says whether
the tree is the full ImageNet-1k (1,281,167 / 50,000 images, 1,000 classes).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torchvision.datasets import imagenet as tv_imagenet
from torchvision.datasets.imagenet import load_meta_file, parse_devkit_archive, parse_val_archive
from torchvision.datasets.utils import extract_archive
from tqdm.auto import tqdm

from mimbench.atomic import atomic_write_text, check_writable_dir
from mimbench.errors import MimbenchError

#: The official archives by the name torchvision gives their parts; their file names and MD5 sums are
#: torchvision's (``torchvision.datasets.imagenet.ARCHIVE_META``).
ARCHIVE_NAMES = {part: name for part, (name, _) in tv_imagenet.ARCHIVE_META.items()}
OFFICIAL_MD5 = {part: md5 for part, (_, md5) in tv_imagenet.ARCHIVE_META.items()}
#: Sizes in bytes of the image archives image-net.org distributes (the 2.5 MB devkit is checked by its MD5 sum).
OFFICIAL_SIZES = {"train": 147_897_477_120, "val": 6_744_924_160}
#: ImageNet-1k (ILSVRC2012): training images, validation images, classes.
FULL_COUNTS = {"train": 1_281_167, "val": 50_000, "classes": 1_000}
STATE = ".mimbench-imagenet"  # under TREE: markers and partial extractions; ImageFolder never looks there
COMMAND = "mimbench data imagenet --archives DIR --out TREE"
_WNID_TAR = re.compile(r"^(n\d{8})\.tar$")
_VAL_FILE = re.compile(r"^ILSVRC2012_val_\d{8}\.JPEG$")
_MD5_CHUNK = 16 * 2**20


@dataclass
class Archives:
    """The three archives of one ImageNet copy, as checked before any work: paths, the train archive's
    class tars (wnid -> member), the val images, and the devkit's labels (torchvision's meta file)."""

    paths: dict[str, Path]
    class_tars: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    val_files: list[str] = field(default_factory=list)
    val_wnids: list[str] = field(default_factory=list)
    wnid_to_classes: dict[str, tuple[str, ...]] = field(default_factory=dict)


def find_archives(directory: str | Path) -> dict[str, Path]:
    """The three archives in ``directory`` by their official names; MimbenchError naming what is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MimbenchError(f"The archives folder {directory} does not exist.",
                            f"Pass --archives the folder that holds {', '.join(ARCHIVE_NAMES.values())}.")
    paths = {part: directory / name for part, name in ARCHIVE_NAMES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        found = sorted(p.name for p in directory.iterdir() if p.name.endswith((".tar", ".tar.gz", ".tgz")))
        raise MimbenchError(
            f"{directory} lacks {', '.join(missing)}" + (f" (archives there: {', '.join(found)})" if found else "")
            + ".",
            "Download the ILSVRC2012 archives from https://image-net.org/download-images (Training images "
            "(Task 1 & 2), Validation images (all tasks), Development kit (Task 1 & 2)) into that folder under "
            "their own names; rename a file the browser renamed.")
    return paths


def check_official_files(paths: dict[str, Path]) -> None:
    """The image archives have the official sizes (else: an incomplete download, or not those files) and the
    devkit the official MD5 sum (a moment to compute)."""
    wrong = [f"{paths[part].name} is {paths[part].stat().st_size:,} bytes, the official file {size:,}"
             for part, size in OFFICIAL_SIZES.items() if paths[part].stat().st_size != size]
    if _file_md5(paths["devkit"]) != OFFICIAL_MD5["devkit"]:
        wrong.append(f"{paths['devkit'].name} does not have the official MD5 sum")
    if wrong:
        listed = "; ".join(wrong)
        raise MimbenchError(
            f"Not the official ImageNet archives: {listed}. A smaller file is an incomplete download.",
            "Download the file again (or resume the download). For archives of the same structure that you "
            "built yourself (a subset), pass --custom-archives: sizes and MD5 sums are then not checked.")


def _members(path: Path, compressed: bool = False) -> list[tarfile.TarInfo]:
    """The members of a tar archive, refusing a damaged or truncated one: in a plain tar, a member reaching
    past the end of the file (listing seeks past the data); a compressed one is read through to its end."""
    try:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise MimbenchError(f"{path} is incomplete or damaged: not a readable tar archive ({exc}).",
                            "Download it again: the file is damaged or incomplete.") from exc
    size = path.stat().st_size
    if not compressed and any(m.offset_data + m.size > size for m in members):
        raise MimbenchError(f"{path} is incomplete: its last member reaches past the end of the file "
                            f"({size:,} bytes).", "Download it again (or resume the download).")
    return members


def _train_class_tars(path: Path) -> dict[str, tarfile.TarInfo]:
    members = _members(path)
    tars = {m: _WNID_TAR.match(m.name) for m in members}
    odd = [m.name for m, match in tars.items() if not (match and m.isfile())]
    if odd or not members:
        raise MimbenchError(
            f"{path} is not an ImageNet train archive: it should hold only per-class tars named "
            f"n########.tar" + (f", and holds {', '.join(odd[:5])}{' ...' if len(odd) > 5 else ''}" if odd else
                                 ", and is empty") + ".",
            f"Pass the {ARCHIVE_NAMES['train']} from image-net.org (or one of the same structure).")
    return {match.group(1): m for m, match in tars.items()}


def _val_files(path: Path) -> list[str]:
    members = _members(path)
    odd = [m.name for m in members if not (m.isfile() and _VAL_FILE.match(m.name))]
    if odd or not members:
        raise MimbenchError(
            f"{path} is not an ImageNet val archive: it should hold only flat files named "
            f"ILSVRC2012_val_########.JPEG" + (f", and holds {', '.join(odd[:5])}" if odd else ", and is empty") + ".",
            f"Pass the {ARCHIVE_NAMES['val']} from image-net.org (or one of the same structure).")
    return sorted(m.name for m in members)


@contextmanager
def _md5_checked_here():
    """torchvision's parse functions each check their archive's MD5 sum; this module checks them once
    beforehand (:func:`verify_md5`, remembered across runs) or not at all (``--custom-archives``), so they
    run with the sums taken out of ``ARCHIVE_META`` (torchvision then only checks that the file exists)."""
    saved = dict(tv_imagenet.ARCHIVE_META)
    tv_imagenet.ARCHIVE_META.update({part: (name, None) for part, (name, _) in saved.items()})
    try:
        yield
    finally:
        tv_imagenet.ARCHIVE_META.update(saved)


def read_devkit(path: Path, workdir: Path) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """``(wnid -> class names, the wnid of each validation image in file order)`` by torchvision's
    ``parse_devkit_archive`` (meta.mat's leaf synsets, the ground-truth file's 1-based synset ids)."""
    members = _members(path, compressed=True)
    if any(m.name.startswith(("/", "..")) or "/../" in m.name for m in members):
        raise MimbenchError(f"{path} holds paths outside its own folder.", "Pass the official devkit archive.")
    try:
        with _md5_checked_here():
            parse_devkit_archive(str(workdir), str(path.resolve()))
        return load_meta_file(str(workdir))
    except Exception as exc:  # a missing file, scipy's MatReadError, a malformed struct: all "not a devkit"
        raise MimbenchError(
            f"{path} is not an ILSVRC2012 devkit: torchvision could not read ILSVRC2012_devkit_t12/data/meta.mat "
            f"and data/ILSVRC2012_validation_ground_truth.txt from it ({type(exc).__name__}: {exc}).",
            f"Pass the {ARCHIVE_NAMES['devkit']} from image-net.org (or one of the same layout).") from exc


def check_consistent(archives: Archives) -> None:
    """The val archive holds one image per ground-truth line; the train classes are the val classes."""
    val, train = archives.paths["val"], archives.paths["train"]
    if len(archives.val_files) != len(archives.val_wnids):
        raise MimbenchError(
            f"{val.name} holds {len(archives.val_files):,} images and the devkit's ground truth labels "
            f"{len(archives.val_wnids):,}: they are not from the same copy of ImageNet.",
            "Use the devkit and val archive that belong together (ILSVRC2012: 50,000 each).")
    unknown = sorted(set(archives.class_tars) - set(archives.wnid_to_classes))
    train_only = sorted(set(archives.class_tars) - set(archives.val_wnids))
    val_only = sorted(set(archives.val_wnids) - set(archives.class_tars))
    if unknown or train_only or val_only:
        parts = [f"{label}: {', '.join(w[:5])}{' ...' if len(w) > 5 else ''}" for label, w in
                 (("not synsets of the devkit", unknown), ("in train but not in val", train_only),
                  ("in val but not in train", val_only)) if w]
        raise MimbenchError(f"The classes of {train.name} and of the devkit's validation labels differ ("
                            + "; ".join(parts) + ").",
                            "Use archives of one ImageNet copy; every evaluation needs the same classes in both "
                            "splits.")


def read_archives(directory: str | Path, workdir: Path, custom: bool) -> Archives:
    """Find and check the archives (names, sizes unless ``custom``, structure, consistency); no extraction."""
    paths = find_archives(directory)
    if not custom:
        check_official_files(paths)
    archives = Archives(paths=paths, class_tars=_train_class_tars(paths["train"]),
                        val_files=_val_files(paths["val"]))
    archives.wnid_to_classes, archives.val_wnids = read_devkit(paths["devkit"], workdir)
    check_consistent(archives)
    return archives


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                      desc=f"md5 {path.name}", leave=False) as bar:
        for chunk in iter(lambda: fh.read(_MD5_CHUNK), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_md5(paths: dict[str, Path], state: Path) -> None:
    """Each archive's MD5 sum is torchvision's; a verified sum is remembered (file size and mtime) in ``state``."""
    for part in OFFICIAL_SIZES:  # the devkit's sum was checked with the sizes (check_official_files)
        path = paths[part]
        stat = path.stat()
        stamp = f"{OFFICIAL_MD5[part]} {stat.st_size} {stat.st_mtime_ns}"
        marker = state / f"md5-{path.name}.ok"
        if marker.is_file() and marker.read_text().strip() == stamp:
            continue
        if _file_md5(path) != OFFICIAL_MD5[part]:
            raise MimbenchError(f"{path} has the official size but not the official MD5 sum: it is damaged.",
                                "Download it again.")
        atomic_write_text(marker, stamp + "\n", what="the MD5 marker", fix="Pass an --out you can write to.")


def _done(state: Path, split: str, name: str) -> int | None:
    """The image count of a class (or of the val split) marked complete, None when not marked."""
    marker = state / split / f"{name}.done"
    try:
        return int(marker.read_text())
    except (OSError, ValueError):
        return None


def _commit(staged: Path, final: Path, state: Path, split: str, name: str, count: int) -> None:
    """Move a finished extraction into the tree, then write its marker (the commit point)."""
    if final.exists():  # left by an interrupted run before its marker: not trusted
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)
    atomic_write_text(state / split / f"{name}.done", f"{count}\n", what="the completion marker",
                      fix="Pass an --out you can write to.")


def _count_files(folder: Path) -> int:
    return sum(1 for entry in os.scandir(folder) if entry.is_file()) if folder.is_dir() else 0


def _extract_class(train_tar: tarfile.TarFile, member: tarfile.TarInfo, wnid: str, staging: Path) -> int:
    """One class tar into ``staging/wnid`` by torchvision's ``extract_archive``; returns its image count."""
    class_tar = staging / member.name
    with train_tar.extractfile(member) as src, open(class_tar, "wb") as dst:
        shutil.copyfileobj(src, dst, _MD5_CHUNK)
    images = _members(class_tar)
    odd = [m.name for m in images if not m.isfile() or "/" in m.name or m.name.startswith(".")]
    if odd:
        raise MimbenchError(f"The class tar {member.name} holds entries that are not flat image files: "
                            f"{', '.join(odd[:5])}.", "Pass the official train archive.")
    extract_archive(str(class_tar), str(staging / wnid), remove_finished=True)
    count = _count_files(staging / wnid)
    if count != len(images):
        raise MimbenchError(f"{member.name} holds {len(images)} images and {count} were extracted.",
                            "Check the free space of --out and run the command again (it resumes).")
    return count


def extract_train(archives: Archives, tree: Path, state: Path) -> dict[str, int]:
    """Every class of the train archive not yet marked complete; returns wnid -> image count."""
    counts = {w: n for w in archives.class_tars if (n := _done(state, "train", w)) is not None
              and (tree / "train" / w).is_dir()}
    staging = state / "partial" / "train"
    with tarfile.open(archives.paths["train"]) as train_tar, \
            tqdm(total=len(archives.class_tars), initial=len(counts), unit="class", desc="train") as bar:
        for wnid, member in archives.class_tars.items():
            if wnid in counts:
                continue
            shutil.rmtree(staging, ignore_errors=True)  # an interrupted extraction is redone, never trusted
            staging.mkdir(parents=True)
            counts[wnid] = _extract_class(train_tar, member, wnid, staging)
            _commit(staging / wnid, tree / "train" / wnid, state, "train", wnid, counts[wnid])
            bar.update(1)
            bar.set_postfix(images=f"{sum(counts.values()):,}")
    shutil.rmtree(staging, ignore_errors=True)
    return counts


def extract_val(archives: Archives, tree: Path, state: Path) -> int:
    """The val archive sorted into class folders by torchvision's ``parse_val_archive`` (unless marked complete)."""
    done = _done(state, "val", "val")
    if done is not None and (tree / "val").is_dir():
        return done
    staging = state / "partial" / "val-root"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tqdm(total=len(archives.val_files), unit="img", desc="val") as bar, _md5_checked_here():
        parse_val_archive(str(staging), str(archives.paths["val"].resolve()), wnids=archives.val_wnids)
        bar.update(len(archives.val_files))
    count = sum(_count_files(d) for d in (staging / "val").iterdir())
    _commit(staging / "val", tree / "val", state, "val", "val", count)
    shutil.rmtree(staging, ignore_errors=True)
    return count


def _refuse_foreign_tree(tree: Path) -> None:
    """A train/ or val/ folder this command did not write is never overwritten."""
    theirs = [tree / s for s in ("train", "val") if (tree / s).exists()]
    if theirs and not (tree / STATE).is_dir():
        raise MimbenchError(f"{', '.join(map(str, theirs))} already exist and were not written by this command.",
                            "Pass --out a new or empty folder (or the one a previous run of this command wrote).")


def check_free_space(archives: Archives, tree: Path, state: Path) -> None:
    """The disk under ``tree`` holds what remains to extract (the archives' sizes are the images' sizes)."""
    todo = [m.size for w, m in archives.class_tars.items() if _done(state, "train", w) is None]
    need = sum(todo) + max(todo, default=0)  # + one class tar staged next to its images
    if _done(state, "val", "val") is None:
        need += archives.paths["val"].stat().st_size
    free = shutil.disk_usage(tree).free
    if need > free:
        raise MimbenchError(f"{tree} has {free / 2**30:.1f} GiB free and the extraction needs about "
                            f"{need / 2**30:.1f} GiB more.", "Free space there, or pass another --out.")


def count_tree(tree: Path, expected_train: dict[str, int], expected_val: int, state: Path) -> dict:
    """The images on disk against what the archives hold; a class that differs loses its marker (redone by
    the next run) and the run fails naming it."""
    on_disk = {d.name: _count_files(d) for d in (tree / "train").iterdir() if d.is_dir()}
    wrong = sorted(w for w in set(on_disk) | set(expected_train) if on_disk.get(w) != expected_train.get(w))
    val_on_disk = sum(_count_files(d) for d in (tree / "val").iterdir() if d.is_dir())
    val_classes = sorted(d.name for d in (tree / "val").iterdir() if d.is_dir())
    for wnid in wrong:
        (state / "train" / f"{wnid}.done").unlink(missing_ok=True)
    if val_on_disk != expected_val or val_classes != sorted(expected_train):
        (state / "val" / "val.done").unlink(missing_ok=True)
    if wrong or val_on_disk != expected_val or val_classes != sorted(expected_train):
        raise MimbenchError(
            f"The tree {tree} does not hold what the archives do: "
            + (f"train classes {', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''} differ in image count; "
               if wrong else "")
            + f"val holds {val_on_disk:,} images in {len(val_classes)} classes, the archives {expected_val:,} in "
            f"{len(expected_train)}.",
            "Files were changed during the extraction; run the command again: it redoes those parts.")
    return {"train": sum(on_disk.values()), "val": val_on_disk, "classes": len(on_disk)}


def build_imagenet_tree(archives_dir: str | Path, out: str | Path, *, custom: bool = False,
                        md5: bool = True) -> dict:
    """``mimbench data imagenet``: check the archives, extract what is not done, count the tree (module
    docstring). Returns ``{"train", "val", "classes"}`` counts, ``"full"`` (the whole ImageNet-1k) and ``"tree"``."""
    _refuse_foreign_tree(Path(out))
    with tempfile.TemporaryDirectory(prefix="mimbench-devkit-") as workdir:
        archives = read_archives(archives_dir, Path(workdir), custom)
    tree = check_writable_dir(out)
    state = tree / STATE
    check_free_space(archives, tree, state)
    if md5 and not custom:
        verify_md5(archives.paths, state)
    counts = extract_train(archives, tree, state)
    extract_val(archives, tree, state)
    totals = count_tree(tree, counts, len(archives.val_wnids), state)
    shutil.rmtree(state / "partial", ignore_errors=True)
    return {**totals, "full": totals == FULL_COUNTS, "tree": str(tree)}


def format_summary(summary: dict) -> str:
    """The closing line: counts, and whether the tree is the full ImageNet-1k."""
    counts = (f"{summary['train']:,} train / {summary['val']:,} val images, {summary['classes']:,} classes")
    if summary["full"]:
        return f"ImageNet tree at {summary['tree']}: {counts} - the full ImageNet-1k (ILSVRC2012)."
    full = f"{FULL_COUNTS['train']:,} / {FULL_COUNTS['val']:,} images, {FULL_COUNTS['classes']:,} classes"
    return (f"ImageNet tree at {summary['tree']}: {counts} - not the full ImageNet-1k ({full}); scores on it are "
            f"not comparable with published ImageNet numbers.")
