"""FashionMNIST-Seg: a deterministic segmentation set made of Fashion-MNIST garments, in the ADE20K layout.

Each image is a ``canvas``×``canvas`` grey canvas (saved as RGB JPEG, 32×32 by default) holding
``garments`` garments of the embedded subset (training garments for ``training``, validation garments for
``validation``), pasted at random positions with a random scale in ``scale`` (of the 28-pixel original);
later garments occlude earlier ones. The label map (PNG, uint8) is ``class + 1`` where a garment's pixel
intensity exceeds ``FOREGROUND_THRESHOLD`` and 0 (background) elsewhere, so there are 11 classes and label
0 is a real, scored class (no zero-label reduction, unlike ADE20K's "other").

Why one garment on a 32×32 canvas: that is the resolution and object scale the built-in encoders are
pre-trained at (28-pixel garments in 32×32 images, patch 4, an 8×8 token grid), so the backbone runs
on its own position-embedding grid. On the earlier 64×64 canvases with 2-4 garments (a 16×16 resampled
grid) the patch tokens of even a supervised Fashion-MNIST classifier (81% top-1) held no more garment-class
information than a random encoder's (token linear probe 20.0 vs 18.2 mIoU; UperNet after 300 iterations
11.45 vs 11.63), so the set could not tell encoders apart. On this layout the same probe gives 46.8 vs
31.2, and the UperNet demo config after 1,000 iterations 45.2 vs 34.0 (random: mean of 3 seeds), with
MAE encoders in between by pre-training length (10 epochs 36.9, 30 epochs 38.3; README).

It is a functional test of the segmentation pipeline that can rank encoders of the built-in scale, not a
benchmark: numbers on it say nothing about ADE20K.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimbench.atomic import atomic_write, atomic_write_text
from mimbench.data.builtin import SUBSET_FILE, resize_grey, subset_arrays
from mimbench.errors import MimbenchError

FOREGROUND_THRESHOLD = 40  # of 255: the faint fringe of a garment counts as background
SPLITS = {"training": "train", "validation": "val"}
ADE_LAYOUT = "ROOT/images/{training,validation}/*.jpg and ROOT/annotations/{training,validation}/*.png"
MANIFEST = "fashion-mnist-seg.json"


def _compose(rng: np.random.Generator, images: torch.Tensor, labels: torch.Tensor, canvas: int,
             garments: tuple[int, int], scale: tuple[float, float]):
    img = np.zeros((canvas, canvas), np.uint8)
    ann = np.zeros((canvas, canvas), np.uint8)
    for _ in range(int(rng.integers(garments[0], garments[1] + 1))):
        idx = int(rng.integers(len(labels)))
        size = int(round(28 * rng.uniform(*scale)))
        size = min(size, canvas)
        g = (resize_grey(images[idx: idx + 1], size)[0, 0] * 255).round().to(torch.uint8).numpy()
        y, x = (int(rng.integers(0, canvas - size + 1)) for _ in range(2))
        fg = g > FOREGROUND_THRESHOLD
        img[y: y + size, x: x + size][fg] = g[fg]
        ann[y: y + size, x: x + size][fg] = int(labels[idx]) + 1
    return img, ann


def build_fashion_mnist_seg(root: str | Path, n_train: int = 1000, n_val: int = 200, canvas: int = 32,
                            seed: int = 0, garments: tuple[int, int] = (1, 1),
                            scale: tuple[float, float] = (0.75, 32 / 28)) -> Path:
    """Write the set under ``root`` (ADE20K layout) unless the same parameters are already there; returns root.

    ``garments``: (fewest, most) garments per canvas; ``scale``: range of garment sizes relative to 28 pixels
    (capped at the canvas). The manifest (parameters, sha256 of the embedded source data, and the size of
    every file) is written last, atomically: the set is reused only when the manifest matches and every
    listed file is there with its size, so an interrupted, tampered or stale build is redone, never read.
    """

    if not 1 <= garments[0] <= garments[1]:
        raise MimbenchError(f"garments={garments} must be (fewest, most) with 1 <= fewest <= most.",
                            "Pass e.g. garments=(1, 1) or (2, 4).")
    if not 0 < scale[0] <= scale[1]:
        raise MimbenchError(f"scale={scale} must be (smallest, largest) with 0 < smallest <= largest.",
                            "Pass e.g. scale=(0.75, 1.14).")
    root = Path(root)
    params = {"n_train": n_train, "n_val": n_val, "canvas": canvas, "seed": seed, "threshold": FOREGROUND_THRESHOLD,
              "garments": list(garments), "scale": [float(v) for v in scale], "format": 2,
              "source_sha256": _source_sha256()}
    manifest = root / MANIFEST
    if manifest.is_file():
        if _manifest_holds(root, manifest, params):
            return root
        manifest.unlink()
    try:
        for split, src in SPLITS.items():
            images, labels = subset_arrays(src)
            count = n_train if split == "training" else n_val
            rng = np.random.default_rng([seed, 0 if split == "training" else 1])
            img_dir, ann_dir = root / "images" / split, root / "annotations" / split
            for d in (img_dir, ann_dir):
                d.mkdir(parents=True, exist_ok=True)
                for old in d.iterdir():
                    old.unlink()
            fix = "Choose a writable output directory with free space."
            for i in range(count):
                img, ann = _compose(rng, images, labels, canvas, garments, scale)
                img_rgb = Image.fromarray(img).convert("RGB")
                # many small files: no fsync each; the durable manifest written last is the commit point
                atomic_write(img_dir / f"fmseg_{i:05d}.jpg", lambda t: img_rgb.save(t, format="JPEG", quality=95),
                             what="a FashionMNIST-Seg image", fix=fix, durable=False)
                atomic_write(ann_dir / f"fmseg_{i:05d}.png", lambda t: Image.fromarray(ann).save(t, format="PNG"),
                             what="a FashionMNIST-Seg label map", fix=fix, durable=False)
        files = {str(f.relative_to(root)): f.stat().st_size
                 for sub in ("images", "annotations") for f in sorted((root / sub).rglob("*")) if f.is_file()}
        atomic_write_text(manifest, json.dumps({**params, "files": files}), what="the FashionMNIST-Seg manifest",
                          fix="Choose a writable output directory with free space.")
    except OSError as exc:
        raise MimbenchError(f"FashionMNIST-Seg could not be written under {root} ({exc}).",
                            "Choose a writable output directory.") from exc
    return root


def _source_sha256() -> str:
    return hashlib.sha256(SUBSET_FILE.read_bytes()).hexdigest()


def _manifest_holds(root: Path, manifest: Path, params: dict) -> bool:
    """True when ``manifest`` was written for ``params`` and every file it lists has its recorded size."""
    try:
        saved = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(saved, dict) or {k: v for k, v in saved.items() if k != "files"} != params:
        return False
    files = saved.get("files")
    if not isinstance(files, dict) or len(files) != 2 * (params["n_train"] + params["n_val"]):
        return False
    for rel, size in files.items():
        try:
            if (root / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def check_ade20k_layout(root: str | Path) -> Path:
    """Check an ADE20K-layout root (``ADEChallengeData2016``); MimbenchError naming what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise MimbenchError(f"Segmentation data root {root} does not exist.",
                            f"Pass the ADEChallengeData2016 folder, an ADE20K-layout root: {ADE_LAYOUT}.")
    for split in SPLITS:
        imgs, anns = root / "images" / split, root / "annotations" / split
        for d in (imgs, anns):
            if not d.is_dir():
                raise MimbenchError(f"{root} lacks the folder {d.relative_to(root)}.", f"Expected an ADE20K-layout root: {ADE_LAYOUT}.")
        n_img = sum(1 for p in imgs.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        n_ann = sum(1 for p in anns.iterdir() if p.suffix.lower() == ".png")
        if n_img == 0:
            raise MimbenchError(f"{imgs} holds no images.", f"Expected an ADE20K-layout root: {ADE_LAYOUT}.")
        if n_img != n_ann:
            raise MimbenchError(f"{split}: {n_img} images but {n_ann} annotations under {root}.",
                                "Every image needs a .png label map of the same name in annotations/.")
    return root
