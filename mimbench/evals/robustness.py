"""Robustness of one fine-tuned classifier (MAE Table 13): ImageNet-C mCE, ImageNet-A, -R, -Sketch and ImageNetV2
top-1, each set evaluated the way its authors do, from the model a fine-tune saved (:mod:`mimbench.evals.classifier`);
at demo scale, Fashion-MNIST-C built from the embedded test split.

The sets (``--sets``, config ``sets``), each read from its own root (``--root SET=PATH``, or the folder named in
:data:`DEFAULT_FOLDERS` under ``--data``):

* ``in-a`` (hendrycks/natural-adv-examples ``eval.py``) and ``in-r`` (hendrycks/imagenet-r ``eval.py``): 200 wnid
  folders; the 1000 logits are restricted to the set's classes (:data:`CLASS_SUBSETS`: their ImageNet-1k indices in
  the authors' order, the same lists as timm's ``imagenet_a_indices.txt`` / ``imagenet_r_indices.txt``; the two sets
  share 86 classes), and label i is the i-th of the 200 sorted wnids.
* ``sketch`` (ImageNet-Sketch): the 1000 ImageNet wnid folders.
* ``v2`` (modestyachts/ImageNetV2; variant ``v2_variant``: matched-frequency, threshold0.7 or top-images): class
  folders ``0`` ... ``999`` mapped by their integer value (a string sort puts "10" before "2": wrong labels), or the
  1000 wnid folders; a root mixing the two, or holding other names, is refused.
* ``in-c`` (hendrycks/robustness): ``<corruption>/<severity 1-5>/<wnid>/``; CE_c = 100 * mean over severities of the
  top-1 error / AlexNet's error on c (:data:`ALEXNET_ERRORS`), mCE = the mean over the 15 corruptions
  (google-research/augmix ``compute_mce``, :func:`mce`); the 4 extra corruptions are reported as errors, never in the
  mCE. A root missing corruptions or severities is evaluated as far as it goes, what is missing listed, and no mCE
  is given.
* ``fmnist-c`` (demo scale, no download): the embedded Fashion-MNIST test split (padded to 32x32) under the
  :data:`FMNIST_C_CORRUPTIONS` at severities 1-5 (the ``imagecorruptions`` package, the extra ``robustness``). Its
  normaliser is a reference classifier's error instead of AlexNet's (``--reference``; the demo passes the
  random-initialisation control's fine-tune), so that mCE stays a ratio: CE_c = 100 * mean_s err(model, c, s) /
  mean_s err(reference, c, s). Without a reference the record holds the errors and their mean, and no mCE.

Pre-processing: the fine-tune's eval transform (Resize(S / 0.875) bicubic + CenterCrop(S), S = the model's input
size), except ImageNet-C, whose images are 224 already: CenterCrop(S) only. One run record per set.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
import types
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import timm.data
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import Dataset

from mimbench import dist
from mimbench.atomic import atomic_write
from mimbench.config import config_sha256
from mimbench.data.builtin import FASHION_MNIST_CLASSES, resize_grey, subset_arrays
from mimbench.encoders import encoder_sha256
from mimbench.errors import MimbenchError
from mimbench.evals import runner
from mimbench.evals.classifier import classifier_path, load_classifier, read_classifier_metadata
from mimbench.evals.features import eval_resize
from mimbench.evals.metrics import topk_accuracy
from mimbench.fastpath import match_attention, under_autocast
from mimbench.results.records import new_record, write_record
from mimbench.schema import ROBUSTNESS_SETS

__all__ = ["ALEXNET_ERRORS", "CLASS_SUBSETS", "DEFAULT_FOLDERS", "FMNIST_C_CORRUPTIONS", "IMAGENET_C_CORRUPTIONS",
           "IMAGENET_C_EXTRA", "SEVERITIES", "build_fashion_mnist_c", "corruption_errors", "imagenet_c_layout",
           "imagenet_wnids", "mce", "report_value", "run_robustness", "table13", "v2_samples", "wnid_samples"]

#: ImageNet-1k indices of the ImageNet-A and ImageNet-R classes, in the order of the authors' eval scripts
#: (hendrycks/natural-adv-examples and hendrycks/imagenet-r ``eval.py`` ``indices_in_1k``; timm ships the same
#: lists as ``timm/data/_info/imagenet_{a,r}_indices.txt``).
CLASS_SUBSETS: dict[str, list[int]] = {
    "in-a": [6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97, 99, 105,
             107, 108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277, 283, 287, 291, 295,
             298, 301, 306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324, 326, 327, 330, 334, 335, 336,
             347, 361, 363, 372, 378, 386, 397, 400, 401, 402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438,
             445, 456, 457, 461, 462, 470, 472, 483, 486, 488, 492, 496, 514, 516, 528, 530, 539, 542, 543, 549, 552,
             557, 561, 562, 569, 572, 573, 575, 579, 589, 606, 607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668,
             677, 682, 684, 687, 701, 704, 719, 736, 746, 749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786,
             792, 797, 802, 803, 804, 813, 815, 820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880,
             888, 890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971, 972,
             980, 981, 984, 986, 987, 988],
    "in-r": [1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99, 100, 105,
             107, 113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163, 171, 172, 178, 187,
             195, 199, 203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251, 254, 259, 260, 263, 265, 267,
             269, 276, 277, 281, 288, 289, 291, 292, 293, 296, 299, 301, 308, 309, 310, 311, 314, 315, 319, 323, 327,
             330, 334, 335, 337, 338, 340, 341, 344, 347, 353, 355, 361, 362, 365, 366, 367, 368, 372, 388, 390, 393,
             397, 401, 407, 413, 414, 425, 428, 430, 435, 437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476,
             483, 487, 515, 546, 555, 558, 570, 579, 583, 587, 593, 594, 596, 609, 613, 617, 621, 629, 637, 657, 658,
             701, 717, 724, 763, 768, 774, 776, 779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852, 866, 875, 883,
             889, 895, 907, 928, 931, 932, 933, 934, 936, 937, 943, 945, 947, 948, 949, 951, 953, 954, 957, 963, 965,
             967, 980, 981, 983, 988],
}
#: The 15 ImageNet-C corruptions of the mCE and AlexNet's top-1 error on each (mean over severities 1-5;
#: hendrycks/robustness, as google-research/augmix ``ALEXNET_ERR`` lists them).
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
IMAGENET_C_CORRUPTIONS = tuple(ALEXNET_ERRORS)
#: ImageNet-C's held-out corruptions: reported, never part of the mCE.
IMAGENET_C_EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)
#: Fashion-MNIST-C: the ImageNet-C corruptions that ``imagecorruptions`` 1.1.2 computes on 32x32 images with the numpy
#: 2 / scikit-image 0.26 of the lock file, within a few ms each and reproducibly (glass_blur and fog fail there:
#: removed ``multichannel`` and ``np.float_``; frost takes ~5 ms an image; impulse_noise draws from an unseeded
#: scikit-image generator), the noise / blur / weather / digital families all kept.
FMNIST_C_CORRUPTIONS = ("gaussian_noise", "shot_noise", "defocus_blur", "motion_blur", "zoom_blur",
                        "snow", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
#: Record ``dataset.name`` of each set (``{variant}``: the ImageNetV2 variant).
DATASET_NAMES = {"in-c": "imagenet-c", "in-a": "imagenet-a", "in-r": "imagenet-r", "sketch": "imagenet-sketch",
                 "v2": "imagenetv2-{variant}", "fmnist-c": "fashion-mnist-c"}
#: Each set's folder under ``--data`` when ``--root`` does not name it (the names of the authors' archives).
DEFAULT_FOLDERS = {"in-c": "imagenet-c", "in-a": "imagenet-a", "in-r": "imagenet-r", "sketch": "sketch",
                   "v2": "imagenetv2-{variant}-format-val"}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
FMNIST_C_FILE, FMNIST_C_MANIFEST = "fashion-mnist-c.npz", "manifest.json"
FMNIST_C_SIZE = 32  # the embedded images padded 28 -> 32, as the demo encoders read them (imagecorruptions: >= 32)


# ---------------------------------------------------------------------------- mCE
def corruption_errors(errors: Mapping[str, Sequence[float]], normalisers: Mapping[str, float]) -> dict[str, float]:
    """CE of each corruption of ``normalisers``: 100 * mean of ``errors[c]`` (top-1 error fractions, one per
    severity) / ``normalisers[c]``; MimbenchError naming the corruptions ``errors`` lacks."""
    missing = [c for c in normalisers if c not in errors]
    if missing:
        raise MimbenchError(f"No errors for {len(missing)} of the {len(normalisers)} corruptions of the mCE: "
                            f"{', '.join(missing)}.", "An mCE needs every one of them; evaluate the missing ones.")
    return {c: 100.0 * float(np.mean(errors[c])) / float(normalisers[c]) for c in normalisers}


def mce(errors: Mapping[str, Sequence[float]], normalisers: Mapping[str, float] | None = None) -> float:
    """Mean corruption error in percent of ``errors`` (corruption -> the top-1 error fractions of severities 1-5).

    Default normalisers: AlexNet's errors on the 15 ImageNet-C corruptions (:data:`ALEXNET_ERRORS`); each of the
    15 needs its five severities, and other corruptions (the 4 extra ones) are not counted. With ``normalisers``
    (corruption -> error fraction, e.g. a reference model's mean over the same severities) the mean runs over them.
    """
    if normalisers is None:
        normalisers = ALEXNET_ERRORS
        short = {c: len(errors[c]) for c in normalisers if c in errors and len(errors[c]) != len(SEVERITIES)}
        if short:
            raise MimbenchError(f"ImageNet-C's mCE averages severities 1-5; got {short} errors.",
                                "Pass five top-1 error fractions per corruption, severities 1 to 5.")
    ce = corruption_errors(errors, normalisers)
    return float(np.mean(list(ce.values())))


# ---------------------------------------------------------------------------- folder layouts
@lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in class-index order (timm's ``imagenet_synsets.txt``)."""
    path = Path(timm.data.__file__).parent / "_info" / "imagenet_synsets.txt"
    return tuple(path.read_text().split())


def _class_folders(root: Path, what: str) -> list[str]:
    if not root.is_dir():
        raise MimbenchError(f"The {what} root {root} is not a folder.", "Pass the folder that holds its class "
                            "folders, e.g. --root in-a=/data/imagenet-a.")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise MimbenchError(f"{root} holds no class folders ({what}).", "Pass the folder that holds the class folders.")
    return folders


def _images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _check_count(root: Path, what: str, found: int, expected: int, allow_subset: bool) -> None:
    if found != expected and not allow_subset:
        raise MimbenchError(f"{root} holds {found} class folders; {what} has {expected}.",
                            f"Pass the root of the complete {what} (or set allow_subset=True to evaluate a part of "
                            "its classes, recorded as a deviation).")


def wnid_samples(root, wnids: Sequence[str], what: str, *, allow_subset: bool = False) -> list[tuple[str, int]]:
    """``(image path, label)`` of a tree of wnid folders, label = the wnid's position in ``wnids`` (the set's
    classes in label order); MimbenchError for a folder that is not one of ``wnids`` or, unless ``allow_subset``,
    a count other than ``len(wnids)``."""
    root = Path(root)
    folders = _class_folders(root, what)
    index = {w: i for i, w in enumerate(wnids)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise MimbenchError(f"{root} holds {len(unknown)} folders that are not {what} classes: "
                            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}.",
                            f"Pass the root of {what} (its class folders are wnids such as {wnids[0]}).")
    _check_count(root, what, len(folders), len(wnids), allow_subset)
    return [(path, index[f]) for f in folders for path in _images(root / f)]


def v2_samples(root, *, allow_subset: bool = False) -> tuple[list[tuple[str, int]], str]:
    """``((image path, label), layout)`` of an ImageNetV2 root: integer folders ``0`` ... ``999`` labelled by their
    integer value (never by string order), or the 1000 wnid folders; MimbenchError for a mix or other names."""
    root = Path(root)
    folders = _class_folders(root, "ImageNetV2")
    integers = [f for f in folders if f.isdigit() and 0 <= int(f) < 1000]
    wnids = set(imagenet_wnids())
    named = [f for f in folders if f in wnids]
    if integers and len(integers) == len(folders):
        _check_count(root, "ImageNetV2", len(folders), 1000, allow_subset)
        return [(path, int(f)) for f in folders for path in _images(root / f)], "integer"
    if named and len(named) == len(folders):
        return wnid_samples(root, imagenet_wnids(), "ImageNetV2", allow_subset=allow_subset), "wnid"
    other = sorted(set(folders) - set(integers) - set(named))
    raise MimbenchError(f"The class folders of {root} are ambiguous: {len(integers)} integer folders (0-999), "
                        f"{len(named)} wnid folders, {len(other)} others ({', '.join(other[:5]) or '-'}).",
                        "An ImageNetV2 root holds either the integer folders 0 ... 999 of the authors' archives or "
                        "the 1000 ImageNet wnid folders, not both.")


def imagenet_c_layout(root) -> tuple[dict[str, dict[int, Path]], list[str]]:
    """``({corruption: {severity: folder}}, missing)`` of an ImageNet-C root (``<corruption>/<severity>/<wnid>/``):
    the 15 mCE corruptions and the 4 extra ones found, and every corruption or ``corruption/severity`` of the 15
    that is absent."""
    root = Path(root)
    if not root.is_dir():
        raise MimbenchError(f"The ImageNet-C root {root} is not a folder.",
                            "Pass the folder holding gaussian_noise/, shot_noise/, ... e.g. --root in-c=/data/imagenet-c.")
    found: dict[str, dict[int, Path]] = {}
    for name in IMAGENET_C_CORRUPTIONS + IMAGENET_C_EXTRA:
        levels = {s: root / name / str(s) for s in SEVERITIES if (root / name / str(s)).is_dir()}
        if levels:
            found[name] = levels
    if not found:
        raise MimbenchError(f"{root} holds none of the ImageNet-C corruption folders.",
                            "Pass the folder holding gaussian_noise/, shot_noise/, ... (each with 1/ ... 5/).")
    missing = [c if c not in found else f"{c}/{s}" for c in IMAGENET_C_CORRUPTIONS
               for s in (SEVERITIES if c in found else (None,)) if c not in found or s not in found[c]]
    return found, missing


class ImageList(Dataset):
    """``(transform(image), label)`` of a list of ``(path, label)``."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with open(path, "rb") as fh:
                image = Image.open(fh).convert("RGB")
        except OSError as exc:
            raise MimbenchError(f"Image {path} cannot be read ({exc}).", "Replace or delete the file.") from exc
        return self.transform(image), label


def set_transform(name: str, size: int, mean, std) -> tuple[T.Compose, str]:
    """``(transform, description)`` of set ``name`` for a model of input ``size``: ImageNet-C CenterCrop(size)
    only (its images are 224 already), every other set the fine-tune's Resize(size / 0.875) bicubic +
    CenterCrop(size)."""
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if name == "in-c":
        return T.Compose([T.CenterCrop(size), *norm]), f"centercrop{size}/normalize(mean={mean},std={std})"
    resize = eval_resize(size)
    return (T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), *norm]),
            f"resize{resize}-bicubic/centercrop{size}/normalize(mean={mean},std={std})")


# ---------------------------------------------------------------------------- Fashion-MNIST-C
def _corrupt_function():
    """``imagecorruptions.corrupt`` (the extra ``robustness``; imported here: an optional package). Its version 1.1.2
    reads its frost images through setuptools' ``pkg_resources``, which setuptools 81+ no longer ships: a stand-in
    ``resource_filename`` (the file next to the module) is given to that import only."""
    if importlib.util.find_spec("imagecorruptions") is None:
        raise MimbenchError("Fashion-MNIST-C needs the imagecorruptions package, which is not installed.",
                            "pip install 'mimbench[robustness]'")
    stand_in = None
    if importlib.util.find_spec("pkg_resources") is None:
        stand_in = types.ModuleType("pkg_resources")
        stand_in.resource_filename = lambda module, name: str(Path(importlib.util.find_spec(module).origin).parent
                                                              / name)
        sys.modules["pkg_resources"] = stand_in
    try:
        from imagecorruptions import corrupt  # optional package (the extra 'robustness')
    finally:
        if stand_in is not None:
            sys.modules.pop("pkg_resources", None)
    return corrupt


def fashion_mnist_c_arrays(n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(clean N×32×32×3, corrupted C×S×N×32×32×3 uint8, labels N)``: the first ``n`` images of the embedded test
    split (all 2,000 when None), padded to 32x32, under each of :data:`FMNIST_C_CORRUPTIONS` at severities 1-5.
    The random corruptions draw from numpy's global generator seeded by ``(seed, corruption, severity, image)``."""
    corrupt = _corrupt_function()
    images, labels = subset_arrays("val")
    n = len(labels) if n is None else min(int(n), len(labels))
    grey = (resize_grey(images[:n], FMNIST_C_SIZE)[:, 0] * 255).round().to(torch.uint8).numpy()
    clean = np.repeat(grey[..., None], 3, axis=-1)
    out = np.empty((len(FMNIST_C_CORRUPTIONS), len(SEVERITIES), *clean.shape), dtype=np.uint8)
    for c, name in enumerate(FMNIST_C_CORRUPTIONS):
        for s, severity in enumerate(SEVERITIES):
            for i in range(n):
                np.random.seed([seed, c, severity, i])
                out[c, s, i] = np.asarray(corrupt(clean[i], corruption_name=name, severity=severity), dtype=np.uint8)
    return clean, out, labels[:n].numpy().astype(np.int64)


def build_fashion_mnist_c(root, n: int | None = None, seed: int = 0) -> Path:
    """Write Fashion-MNIST-C (:func:`fashion_mnist_c_arrays`) under ``root`` unless the same set is there; returns
    ``root``. The manifest (corruptions, severities, size, seed) is written last: a partial build is redone."""
    root = Path(root)
    params = {"corruptions": list(FMNIST_C_CORRUPTIONS), "severities": list(SEVERITIES), "n": n, "seed": seed,
              "size": FMNIST_C_SIZE}
    manifest = root / FMNIST_C_MANIFEST
    if manifest.is_file() and (root / FMNIST_C_FILE).is_file() and json.loads(manifest.read_text()) == params:
        return root
    clean, corrupted, labels = fashion_mnist_c_arrays(n, seed)
    root.mkdir(parents=True, exist_ok=True)
    fix = "Give the demo an --out folder you can write to."
    atomic_write(root / FMNIST_C_FILE, lambda tmp: np.savez(open(tmp, "wb"), clean=clean, corrupted=corrupted,
                                                           labels=labels), what="Fashion-MNIST-C", fix=fix)
    atomic_write(manifest, lambda tmp: Path(tmp).write_text(json.dumps(params)), what="its manifest", fix=fix)
    return root


def _fashion_mnist_c(data: str, limit: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """The arrays of ``data`` (the first ``limit`` images; None: all): built now for ``builtin:fashion-mnist``, read
    from a folder :func:`build_fashion_mnist_c` wrote otherwise; and the root for the record."""
    if data.startswith("builtin:"):
        return (*fashion_mnist_c_arrays(limit), None)
    path = Path(data) / FMNIST_C_FILE
    if not path.is_file():
        raise MimbenchError(f"{data} holds no {FMNIST_C_FILE}.", "Pass builtin:fashion-mnist or a folder that "
                            "mimbench.evals.robustness.build_fashion_mnist_c wrote.")
    with np.load(path) as z:
        n = len(z["labels"]) if limit is None else min(int(limit), len(z["labels"]))
        return z["clean"][:n], z["corrupted"][:, :, :n], z["labels"][:n], str(Path(data).resolve())


# ---------------------------------------------------------------------------- scoring
def _scorer(run, model: torch.nn.Module):
    model = model.to(run.device).eval()
    match_attention(model, run.precision, run.device)
    return under_autocast(model, run.precision, run.device)


def _error(run, fn, dataset, keep: list[int] | None = None) -> tuple[float, float, int]:
    """``(top-1 %, top-5 %, images)`` of ``fn`` on ``dataset``; ``keep``: the logits kept (a 200-class subset)."""
    logits, labels = runner.score(run, fn, dataset, int(run.cfg.batch_size), num_workers=int(run.cfg.data.num_workers))
    if keep is not None:
        logits = logits[:, keep]
    acc = topk_accuracy(logits, labels, ks=(1, 5))
    return acc[1], acc[5], int(len(labels))


class ArrayImages(Dataset):
    """``(normalised 3×S×S tensor, label)`` of uint8 N×S×S×3 images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std):
        self.images, self.labels = images, labels
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1).float() / 255
        return (x - self.mean) / self.std, int(self.labels[i])


def _fmnist_c_errors(run, model, arrays) -> tuple[float, dict[str, list[float]]]:
    """``(clean top-1 %, {corruption: [top-1 error fraction per severity]})`` of ``model`` on Fashion-MNIST-C."""
    meta = model.mimbench_classifier
    if meta["classes"] != list(FASHION_MNIST_CLASSES):
        raise MimbenchError(f"The model's {len(meta['classes'])} classes are not the Fashion-MNIST ones "
                            f"({', '.join(meta['classes'][:3])} ...).",
                            "Evaluate on fmnist-c a model fine-tuned on builtin:fashion-mnist.")
    clean, corrupted, labels = arrays
    fn = _scorer(run, model)
    mean, std = meta["mean"], meta["std"]
    clean_top1 = _error(run, fn, ArrayImages(clean, labels, mean, std))[0]
    errors = {name: [1.0 - _error(run, fn, ArrayImages(corrupted[c, s], labels, mean, std))[0] / 100.0
                     for s in range(corrupted.shape[1])]
              for c, name in enumerate(FMNIST_C_CORRUPTIONS)}
    return clean_top1, errors


# ---------------------------------------------------------------------------- one record per set
def _check_imagenet_classes(meta: Mapping) -> None:
    classes = list(meta["classes"])
    if classes != list(imagenet_wnids()):
        raise MimbenchError(f"The fine-tuned model's {len(classes)} classes ({', '.join(classes[:3])} ...) are not the "
                            "1000 ImageNet-1k classes in wnid order.",
                            "ImageNet-A/-R/-C/-Sketch/V2 score the 1000 ImageNet logits: evaluate a model fine-tuned "
                            "on ImageNet-1k (train/<wnid>/ folders).")


def _write(run, model_file: Path, meta: Mapping, name: str, *, dataset: dict, metrics: dict, protocol: dict,
           started: float, inputs: Mapping[str, str], deviations: Sequence[str] = ()) -> dict:
    """The run record of set ``name`` (the encoder block: the fine-tune's; ``protocol.inputs``: the sha256 of the
    files read besides the data, ``model`` and ``reference``), written by rank 0 into the run folder."""
    prov = meta["provenance"]
    record = new_record(
        "robustness",
        protocol={"name": run.config_path.stem, "sha256": config_sha256(run.cfg), "config": str(run.config_path),
                  "overrides": list(run.overrides), "deviations": [*run.deviations, *deviations], "set": name,
                  "inputs": inputs,
                  "model": {"path": str(model_file), "sha256": inputs["model"],
                            "finetune_run_id": prov.get("run_id"), "finetune_protocol": (prov.get("protocol") or {})
                            .get("name")}, **protocol},
        encoder=prov["encoder"], dataset=dataset, metrics=metrics, seed=run.seed, started=started,
        finished=time.time(), precision=run.precision, precision_reason=run.precision_choice.reason)
    if run.is_main:
        write_record(run.out, record)
    dist.barrier()
    return record


#: The sets' names in errors and records.
TITLES = {"in-c": "ImageNet-C", "in-a": "ImageNet-A", "in-r": "ImageNet-R", "sketch": "ImageNet-Sketch",
          "v2": "ImageNetV2", "fmnist-c": "Fashion-MNIST-C"}


def _classes_samples(run, name: str, root: Path) -> tuple[list[tuple[str, int]], str]:
    """``(samples, layout)`` of in-a / in-r (their 200 wnids), sketch (the 1000) or v2 (integer or wnid folders)."""
    allow = bool(run.cfg.allow_subset)
    if name in CLASS_SUBSETS:
        wnids = [imagenet_wnids()[i] for i in CLASS_SUBSETS[name]]
        return wnid_samples(root, wnids, TITLES[name], allow_subset=allow), "wnid"
    if name == "v2":
        return v2_samples(root, allow_subset=allow)
    return wnid_samples(root, imagenet_wnids(), TITLES[name], allow_subset=allow), "wnid"


def _subset_deviation(name: str, present: int, expected: int) -> list[str]:
    return [] if present == expected else [f"classes: {present} of the {expected} {TITLES[name]} classes "
                                           "(allow_subset)"]


def _eval_classes(run, model, name: str, root: Path, reference=None) -> tuple[dict, dict, dict, list[str]]:
    """``(metrics, dataset, protocol, deviations)`` of in-a, in-r, sketch or v2: top-1 / top-5 in percent, the
    logits restricted to the set's classes for in-a / in-r."""
    meta = model.mimbench_classifier
    samples, layout = _classes_samples(run, name, root)
    keep = CLASS_SUBSETS.get(name)
    transform, desc = set_transform(name, meta["img_size"], meta["mean"], meta["std"])
    top1, top5, n = _error(run, _scorer(run, model), ImageList(samples, transform), keep)
    expected = len(keep) if keep else 1000
    present = len({label for _, label in samples})
    logits = (f"the {len(keep)} logits of the {TITLES[name]} classes (ImageNet-1k indices of the authors' eval.py)"
              if keep else "all 1000 logits")
    return ({"top1": top1, "top5": top5}, {"sizes": {"val": n}, "classes": present, "layout": layout},
            {"transform": desc, "logits": logits}, _subset_deviation(name, present, expected))


def _eval_imagenet_c(run, model, name: str, root: Path, reference=None) -> tuple[dict, dict, dict, list[str]]:
    """ImageNet-C: the top-1 error of every corruption/severity found; CE per complete corruption of the 15, mCE
    when all 15 are complete; the extra corruptions' mean errors apart."""
    meta = model.mimbench_classifier
    found, missing = imagenet_c_layout(root)
    transform, desc = set_transform("in-c", meta["img_size"], meta["mean"], meta["std"])
    fn, errors, sizes, deviations = _scorer(run, model), {}, {}, []
    for corruption, levels in found.items():
        errors[corruption] = {}
        for severity, folder in sorted(levels.items()):
            samples = wnid_samples(folder, imagenet_wnids(), f"ImageNet-C {corruption}/{severity}",
                                   allow_subset=bool(run.cfg.allow_subset))
            top1, _, n = _error(run, fn, ImageList(samples, transform))
            errors[corruption][str(severity)], sizes[f"{corruption}/{severity}"] = 100.0 - top1, n
            deviations += _subset_deviation("in-c", len({label for _, label in samples}), 1000)
    complete = {c: [e[str(s)] / 100.0 for s in SEVERITIES] for c, e in errors.items() if len(e) == len(SEVERITIES)}
    ce = {c: 100.0 * float(np.mean(complete[c])) / ALEXNET_ERRORS[c] for c in IMAGENET_C_CORRUPTIONS if c in complete}
    metrics = {"error": errors, "ce": ce,
               "extra_error": {c: 100.0 * float(np.mean(complete[c])) for c in IMAGENET_C_EXTRA if c in complete}}
    if missing:
        print(f"mimbench: ImageNet-C at {root} lacks {', '.join(missing)}: no mCE (it needs all 15 corruptions at "
              "severities 1-5); the corruptions found are in the record.", file=sys.stderr)
    else:
        metrics["mCE"] = mce(complete)
    return (metrics, {"sizes": sizes, "missing": missing}, {"transform": desc, "normaliser": "AlexNet top-1 error "
            "(hendrycks/robustness)"}, sorted(set(deviations)))


#: The reference classifiers' Fashion-MNIST-C errors scored in this process, by (model sha256, data, limit, device,
#: precision): a demo scores every encoder against the same control.
REFERENCE_ERRORS: dict[tuple, dict[str, list[float]]] = {}


def _eval_fmnist_c(run, model, name: str, root, reference=None) -> tuple[dict, dict, dict, list[str]]:
    """Fashion-MNIST-C: clean top-1, each corruption's errors, their mean and, with a ``reference`` classifier, the
    CE of each corruption normalised by the reference's error and their mean, the mCE."""
    clean, corrupted, labels, data_root = _fashion_mnist_c(str(root), run.cfg.data.limit_val)
    clean_top1, errors = _fmnist_c_errors(run, model, (clean, corrupted, labels))
    metrics = {"clean_top1": clean_top1, "error": {c: [100.0 * e for e in v] for c, v in errors.items()},
               "mean_error": 100.0 * float(np.mean(list(errors.values())))}
    protocol = {"corruptions": list(FMNIST_C_CORRUPTIONS), "severities": list(SEVERITIES),
                "transform": "32x32 (28 padded by 2), imagecorruptions, normalize", "normaliser": None}
    if reference is not None:
        ref_file = classifier_path(reference)
        same = ref_file.resolve() == classifier_path(run.encoder).resolve()
        key = (encoder_sha256(ref_file), str(root), run.cfg.data.limit_val, str(run.device), run.precision)
        if same:
            REFERENCE_ERRORS[key] = errors
        elif key not in REFERENCE_ERRORS:  # a pipeline scores every encoder against one reference: scored once
            REFERENCE_ERRORS[key] = _fmnist_c_errors(run, load_classifier(ref_file), (clean, corrupted, labels))[1]
        ref_errors = REFERENCE_ERRORS[key]
        normalisers = {c: float(np.mean(v)) for c, v in ref_errors.items()}
        if not all(normalisers.values()):
            raise MimbenchError(f"The reference {ref_file} makes no error on some Fashion-MNIST-C corruption: the CE "
                                "has no normaliser there.", "Use a weaker reference (the random-init control).")
        metrics["ce"] = corruption_errors(errors, normalisers)
        metrics["mCE"] = float(np.mean(list(metrics["ce"].values())))
        protocol["normaliser"] = {"path": str(ref_file), "sha256": encoder_sha256(ref_file),
                                  "error": {c: 100.0 * v for c, v in normalisers.items()}}
    return metrics, {"sizes": {"val": int(len(labels))}, "root": data_root}, protocol, []


EVALUATORS = {"in-c": _eval_imagenet_c, "in-a": _eval_classes, "in-r": _eval_classes, "sketch": _eval_classes,
              "v2": _eval_classes, "fmnist-c": _eval_fmnist_c}


# ---------------------------------------------------------------------------- the run
def _chosen_sets(sets, configured) -> list[str]:
    chosen = [s.strip() for s in sets.split(",") if s.strip()] if isinstance(sets, str) else list(sets or configured)
    bad = [s for s in chosen if s not in ROBUSTNESS_SETS]
    if bad or not chosen:
        raise MimbenchError(f"Unknown robustness set(s): {', '.join(bad) or '(none given)'}.",
                            f"Pass --sets as a comma-separated list of {', '.join(ROBUSTNESS_SETS)}.")
    return list(dict.fromkeys(chosen))


def _roots(chosen: list[str], roots, data: str, variant: str) -> dict[str, Path | str]:
    """Each chosen set's root: ``--root SET=PATH``, else its :data:`DEFAULT_FOLDERS` folder under ``data`` (the data
    itself for fmnist-c); every one checked before any work."""
    given: dict[str, str] = {}
    for item in roots or ():
        key, sep, value = str(item).partition("=")
        if not sep or key.strip() not in ROBUSTNESS_SETS:
            raise MimbenchError(f"--root {item!r} is not SET=PATH with SET one of {', '.join(ROBUSTNESS_SETS)}.",
                                "Example: --root in-a=/data/imagenet-a")
        given[key.strip()] = value.strip()
    out: dict[str, Path | str] = {}
    for name in chosen:
        if name == "fmnist-c":
            out[name] = given.get(name, data)
            continue
        if name not in given and data.startswith("builtin:"):
            raise MimbenchError(f"No root for {TITLES[name]}.", f"Pass --root {name}=PATH (or --data FOLDER holding "
                                f"{DEFAULT_FOLDERS[name].format(variant=variant)}/).")
        out[name] = Path(given[name]) if name in given else Path(data) / DEFAULT_FOLDERS[name].format(variant=variant)
        if not out[name].is_dir():
            raise MimbenchError(f"The {TITLES[name]} root {out[name]} is not a folder.",
                                f"Pass --root {name}=PATH with the folder of its class folders.")
    return out


def _check_model(meta: Mapping, chosen: list[str], img_size) -> None:
    if img_size is not None and int(img_size) != meta["img_size"]:
        raise MimbenchError(f"img_size={img_size}, but the model was fine-tuned at {meta['img_size']}.",
                            "Leave img_size unset: the fine-tuned model is evaluated at its own resolution.")
    if any(name != "fmnist-c" for name in chosen):
        _check_imagenet_classes(meta)


def run_robustness(*, encoder: Path, config: Path, data: str, out: Path, overrides: list[str] = (),
                   resume: bool = False, layout: str = "auto", sets=None, roots=None, reference=None) -> dict:
    """Evaluate the fine-tuned classifier ``encoder`` (``--model``: a fine-tune run folder or its
    ``model.safetensors``) on each set of ``sets`` (``--sets``, default the config's); one record per set in ``out``.

    ``roots``: ``SET=PATH`` strings (``--root``); ``reference``: the classifier whose errors normalise the
    Fashion-MNIST-C CEs. Returns ``{"task", "metrics": {"<set> <metric>": value}, "records": [...]}``."""
    if layout != "auto":
        raise MimbenchError("A fine-tuned model file has no checkpoint layout.", "Leave out --from.")
    model_file = classifier_path(encoder)
    run = runner.start("robustness", encoder=model_file, config=config, data=data, out=out, overrides=overrides,
                       check_encoder=False, encoder_meta=read_classifier_metadata(model_file)["encoder_metadata"])
    chosen = _chosen_sets(sets, run.cfg.sets)
    where = _roots(chosen, roots, str(data), run.cfg.v2_variant)
    model = load_classifier(model_file)
    meta = model.mimbench_classifier
    _check_model(meta, chosen, run.cfg.img_size)
    inputs = {"model": encoder_sha256(model_file)}
    if reference is not None:
        inputs["reference"] = encoder_sha256(classifier_path(reference))
    records = []
    for name in chosen:
        started = time.time()
        metrics, dataset, protocol, deviations = EVALUATORS[name](run, model, name, where[name], reference)
        title = DATASET_NAMES[name].format(variant=run.cfg.v2_variant)
        dataset = {"name": title, "root": str(Path(where[name]).resolve()) if name != "fmnist-c" else None, **dataset}
        records.append(_write(run, model_file, meta, name, dataset=dataset, metrics=metrics, protocol=protocol,
                              started=started, inputs=inputs, deviations=deviations))
    scalars = {f"{r['protocol']['set']} {k}": v for r in records for k, v in r["metrics"].items()
               if isinstance(v, float)}
    return {"task": "robustness", "metrics": scalars, "records": records}


# ---------------------------------------------------------------------------- the report
#: Report column and headline metric of each set's record (``dataset.name``), in MAE Table 13's row order.
REPORT_COLUMNS = {
    "imagenet-c": ("IN-C mCE (lower is better)", "mCE"), "imagenet-a": ("IN-A top-1", "top1"),
    "imagenet-r": ("IN-R top-1", "top1"), "imagenet-sketch": ("IN-Sketch top-1", "top1"),
    "imagenetv2-matched-frequency": ("IN-V2 top-1", "top1"), "imagenetv2-threshold0.7": ("IN-V2 T0.7 top-1", "top1"),
    "imagenetv2-top-images": ("IN-V2 TopImages top-1", "top1"),
    "fashion-mnist-c": ("FMNIST-C mCE (lower is better)", "mCE"),
}
#: Fashion-MNIST-C without a reference classifier: the mean error instead of the mCE.
FMNIST_C_NO_REFERENCE = ("FMNIST-C mean error (lower is better)", "mean_error")


def report_value(row) -> tuple[str, float] | None:
    """``(report column, value)`` of a flattened robustness record; None when it has no headline metric (an
    ImageNet-C root missing corruptions has no mCE)."""
    name = str(row.get("dataset.name"))
    column, metric = REPORT_COLUMNS.get(name, (f"{name} top-1", "top1"))
    value = row.get(f"metrics.{metric}")
    if name == "fashion-mnist-c" and (value is None or value != value):
        column, metric = FMNIST_C_NO_REFERENCE
        value = row.get(f"metrics.{metric}")
    return None if value is None or value != value else (column, float(value))


def table13(summary, labels: Sequence[str]):
    """The robustness cells of a report summary (:func:`mimbench.results.report.summarize`) laid out as MAE Table 13:
    a row per set (Table 13's order), a column per encoder; None with fewer than two sets (the report's own table
    shows one as well)."""
    order = [c for c, _ in REPORT_COLUMNS.values()] + [FMNIST_C_NO_REFERENCE[0]]
    part = summary[summary["task"] == "robustness"]
    if part["column"].nunique() < 2:
        return None
    rows = sorted(part["column"].unique(), key=lambda c: order.index(c) if c in order else len(order))
    table = pd.DataFrame("–", index=pd.Index(rows, name="set"), columns=[lab for lab in labels
                                                                          if lab in set(part["label"])])
    for _, s in part.iterrows():
        table.loc[s["column"], s["label"]] = f"{s['mean']:.1f}"
    return table
