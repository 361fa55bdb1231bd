"""ImageNet-style folders (torchvision ImageFolder) with layout checks, a scan for broken files and readable errors.

Bad data: every image is converted to RGB when it is loaded (greyscale, CMYK, palette and RGBA files are
read as RGB, as the reference pipelines do with ``.convert("RGB")``). Before a run starts, every file of
a split is checked without being decoded - a zero-byte file, a file PIL cannot identify (not an image),
a JPEG without its end-of-image marker or a PNG without its ``IEND`` chunk (truncated downloads and
copies) is *broken*. Rank 0 scans and every rank of a multi-process run uses its list. Broken files
are skipped: left out of the split, counted, reported on stderr and listed in the run record (``dataset.skipped``). The run fails before any work when more than
``max_bad_fraction`` of a split is broken (default 0.1 %: one broken file in ImageNet's 50,000
validation images is tolerated, a half-copied tree is not). A file that passes the scan but still
cannot be decoded stops the run with an error naming it.

Cost: JPEG and PNG are recognised by their signatures and checked by reading 8 bytes at the start and
64 at the end (other formats by PIL's header parser), on a thread pool: about 5,500 files/s on 2 CPU
cores from the page cache (decoding the same JPEGs runs at about 110 files/s), so ImageNet's 50,000
validation images take seconds and its 1.28 M training images a few minutes, once per run.
"""
from __future__ import annotations

import functools
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torchvision.datasets import ImageFolder

from mimbench import dist
from mimbench.errors import MimbenchError

#: Default largest fraction of a split's files that may be broken (skipped) before a run refuses to start.
MAX_BAD_FRACTION = 0.001

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
LAYOUT = "ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG (torchvision ImageFolder, one folder per class)"


def check_imagefolder(root: str | Path, split: str) -> Path:
    """Return ``root/split`` after checking the ImageNet layout; MimbenchError naming what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise MimbenchError(f"Dataset path {root} does not exist or is not a directory.",
                            f"Pass a folder laid out as {LAYOUT}, or builtin:fashion-mnist.")
    split_dir = root / split
    if not split_dir.is_dir():
        raise MimbenchError(f"{root} has no '{split}' folder.", f"Expected layout: {LAYOUT}.")
    classes = sorted(p for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        if any(f.suffix.lower() in IMAGE_SUFFIXES for f in split_dir.iterdir()):  # ILSVRC2012_img_val.tar as is
            raise MimbenchError(f"{split_dir} holds images directly, not in class folders (the flat layout of "
                                "ImageNet's validation archive).",
                                "Build the tree from the official archives: mimbench data imagenet --archives DIR "
                                f"--out TREE (it sorts val by the devkit's labels). Expected layout: {LAYOUT}.")
        raise MimbenchError(f"{split_dir} holds no class folders.", f"Expected layout: {LAYOUT}.")
    for cls in classes:
        if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in cls.iterdir()):
            raise MimbenchError(f"Class folder {cls} holds no images ({', '.join(IMAGE_SUFFIXES)}).",
                                f"Remove the empty folder or add its images. Expected layout: {LAYOUT}.")
    train_dir = root / "train"
    if split != "train" and train_dir.is_dir():
        # ImageFolder numbers classes by their sorted folder names, split by split: a class folder missing
        # from one split shifts every label after it, and the scores would be silently wrong.
        names, train_names = {p.name for p in classes}, {p.name for p in train_dir.iterdir() if p.is_dir()}
        if names != train_names:
            missing, extra = sorted(train_names - names), sorted(names - train_names)
            raise MimbenchError(
                f"{split_dir} and {train_dir} hold different class folders"
                + (f"; not in {split}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "")
                + (f"; not in train: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}" if extra else "")
                + ". Labels are numbered by sorted folder name, so they would not match between the splits.",
                "Give both splits the same class folders (ImageNet: the 1,000 synset folders in each).")
    return split_dir


def _load_rgb(path: str, draft: int | None = None):
    """The RGB image at ``path``; ``draft``: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps
    both sides at least ``draft`` pixels (PIL ``Image.draft``), other formats in full."""
    try:
        with open(path, "rb") as fh:
            img = Image.open(fh)
            if draft and img.format == "JPEG":
                img.draft("RGB", (int(draft), int(draft)))
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise MimbenchError(f"Image {path} cannot be read ({exc}).",
                            "Replace or delete the corrupt file, then run again.") from exc


def load_image(path: str | Path, draft: int | None = None):
    """The RGB image at ``path`` as the folder datasets decode it (``draft``: JPEG downscaled at decode time)."""
    return _load_rgb(str(path), draft=draft)


def image_problem(path: str | Path) -> str | None:
    """Why ``path`` is a broken image file (``None`` when it looks whole), without decoding its pixels."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file (0 bytes)"
        with open(path, "rb") as fh:
            head = fh.read(8)
            if head.startswith(b"\xff\xd8\xff"):  # JPEG and PNG by signature: no parser needed
                fmt = "JPEG"
            elif head == b"\x89PNG\r\n\x1a\n":
                fmt = "PNG"
            else:
                fh.seek(0)
                with Image.open(fh) as im:
                    fmt = im.format
            tail_len = min(size, 64)
            fh.seek(size - tail_len)
            tail = fh.read(tail_len)
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except Exception as exc:  # PIL raises assorted errors on malformed headers
        return f"malformed header ({type(exc).__name__})"
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "PNG" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


def scan_images(paths: list[str], workers: int | None = None) -> list[tuple[str, str]]:
    """``(path, problem)`` for each broken file of ``paths`` (I/O-bound: checked by a thread pool)."""
    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(image_problem, paths, chunksize=256))
    return [(p, why) for p, why in zip(paths, problems) if why is not None]


def _broken_files(paths: list[str]) -> dict[str, str]:
    """``{path: problem}`` of the broken files among ``paths`` as rank 0 sees them, on every rank: one scan,
    and every rank leaves out the same files (a file half-visible on one node's cache would otherwise give
    the ranks datasets of different lengths and orders)."""
    found = scan_images(paths) if dist.is_main() else []
    return dict(dist.broadcast_object(found))


def image_folder(root: str | Path, split: str, transform=None, max_bad_fraction: float | None = None,
                 decode_draft: int | None = None):
    """torchvision ImageFolder over ``root/split`` without its broken files (module docstring); ``decode_draft``:
    JPEGs decoded downscaled to no less than that many pixels a side (:func:`_load_rgb`), None: in full.

    The returned dataset has ``skipped``: ``[{"file": path relative to root/split, "reason": ...}]``.
    MimbenchError when more than ``max_bad_fraction`` (default :data:`MAX_BAD_FRACTION`) of the files are
    broken, and when a file that passed the scan cannot be decoded.
    """
    limit = MAX_BAD_FRACTION if max_bad_fraction is None else float(max_bad_fraction)
    if not 0.0 <= limit <= 1.0:
        raise MimbenchError(f"max_bad_fraction={max_bad_fraction!r} is not a fraction in [0, 1].",
                            "Set data.max_bad_fraction to e.g. 0.001 (0.1 %).")
    split_dir = check_imagefolder(root, split)
    loader = functools.partial(_load_rgb, draft=int(decode_draft)) if decode_draft else _load_rgb
    ds = ImageFolder(str(split_dir), transform=transform, loader=loader)
    bad = _broken_files([path for path, _ in ds.samples])
    ds.skipped = [{"file": os.path.relpath(p, split_dir), "reason": why} for p, why in sorted(bad.items())]
    total = len(ds.samples)
    if bad:
        listed = "; ".join(f"{b['file']}: {b['reason']}" for b in ds.skipped[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        if len(bad) > limit * total:
            raise MimbenchError(
                f"{len(bad)} of {total} files in {split_dir} ({100 * len(bad) / total:.3g} %) are broken, more than "
                f"the {100 * limit:.3g} % allowed: {listed}{more}.",
                "Replace or delete the broken files (a re-download or re-extraction usually fixes a damaged tree), "
                "or raise data.max_bad_fraction if skipping them is acceptable.")
        print(f"mimbench: skipping {len(bad)} broken file(s) of {total} in {split_dir}: {listed}{more}",
              file=sys.stderr)
        ds.samples = [s for s in ds.samples if s[0] not in bad]
        ds.imgs = ds.samples
        ds.targets = [t for _, t in ds.samples]
    return ds


def skipped_files(dataset) -> list[dict]:
    """The broken files a dataset (or a ``Subset`` of one) left out; [] for data without a scan."""
    while hasattr(dataset, "dataset") and not hasattr(dataset, "skipped"):
        dataset = dataset.dataset
    return list(getattr(dataset, "skipped", []))
