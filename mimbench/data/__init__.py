"""Datasets: the embedded Fashion-MNIST subset, FashionMNIST-Seg, and real ImageNet / ADE20K folders.

Datasets are named in configs and on the command line as ``builtin:fashion-mnist``,
``builtin:fashion-mnist-seg`` or a path.
"""
from __future__ import annotations

import math
from pathlib import Path

from mimbench.data.builtin import (FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
                                   FashionMNISTSubset)
from mimbench.data.folders import (IMAGENET_MEAN, IMAGENET_STD, MAX_BAD_FRACTION, check_imagefolder, image_folder,
                                   skipped_files)
from mimbench.errors import MimbenchError

BUILTIN_CLASSIFICATION = ("builtin:fashion-mnist",)

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "FashionMNISTSubset",
           "build_dataset", "dataset_stats", "check_imagefolder", "image_folder", "is_builtin", "MAX_BAD_FRACTION",
           "skipped_files", "draft_size"]


def is_builtin(spec: str) -> bool:
    return str(spec).startswith("builtin:")


def _check_builtin(spec: str) -> None:
    if spec not in BUILTIN_CLASSIFICATION:
        raise MimbenchError(f"Unknown built-in dataset {spec!r}.",
                            f"Known: {', '.join(BUILTIN_CLASSIFICATION)} (or pass an ImageNet-style folder).")


def draft_size(img_size: int) -> int:
    """The JPEG decode-time downscaling target for transforms ending at ``img_size``: no side decoded below
    ``img_size / 0.875`` (256 for 224, the evaluation resize), so a centre crop never upsamples."""
    return math.ceil(int(img_size) / 0.875)


def build_dataset(spec: str, split: str, transform=None, img_size: int = 32, max_bad_fraction: float | None = None,
                  decode_draft: int | None = None):
    """Classification dataset for ``spec`` (builtin name or ImageNet-style root) and ``split`` (train|val).

    Folders skip broken files up to ``max_bad_fraction`` of the split (:func:`image_folder`) and decode JPEGs
    downscaled to ``decode_draft`` pixels a side when it is given (off: None)."""
    spec = str(spec)
    if is_builtin(spec):
        _check_builtin(spec)
        return FashionMNISTSubset(split, img_size=img_size, transform=transform)
    return image_folder(Path(spec), split, transform=transform, max_bad_fraction=max_bad_fraction,
                        decode_draft=decode_draft)


def dataset_stats(spec: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) used to normalise ``spec``: the subset's own, ImageNet's for folders."""
    if is_builtin(str(spec)):
        _check_builtin(str(spec))
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    return IMAGENET_MEAN, IMAGENET_STD
