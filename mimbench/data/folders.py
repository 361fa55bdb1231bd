"""ImageNet-style folders (torchvision ImageFolder) with layout checks and readable errors."""
from __future__ import annotations

from pathlib import Path

from mimbench.errors import MimbenchError

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


def _load_rgb(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise MimbenchError(f"Image {path} cannot be read ({exc}).",
                            "Replace or delete the corrupt file, then run again.") from exc


def image_folder(root: str | Path, split: str, transform=None):
    """torchvision ImageFolder over ``root/split`` whose corrupt images raise MimbenchError naming the file."""
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(check_imagefolder(root, split)), transform=transform, loader=_load_rgb)
