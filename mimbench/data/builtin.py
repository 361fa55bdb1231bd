"""The embedded Fashion-MNIST subset (real images, shipped in the package, no download).

12,000 training and 2,000 validation images, 1,200 / 200 per class, chosen with a fixed seed from
the official Fashion-MNIST train / test splits by ``scripts/build_fashion_mnist_subset.py``.
Images are 28×28 grey garments; the dataset yields them as 3-channel tensors (the grey value in each
channel) so that any RGB ViT takes them unchanged.

Default transform at ``img_size=32``: zero padding of 2 pixels on each side (28 → 32, garment pixels
exact, 8×8 patches of 4 pixels); other sizes: bicubic resize of the 28×28 image. Normalisation uses the
subset's own statistics (train split, 28×28 pixels).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from mimbench.errors import MimbenchError

SUBSET_FILE = Path(__file__).resolve().parent / "fashion_mnist_subset.npz"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Mean / std of the subset's train split over all 28×28 pixels in [0, 1] (tests recompute them).
FASHION_MNIST_MEAN = (0.2870,) * 3
FASHION_MNIST_STD = (0.3536,) * 3
SPLITS = ("train", "val")


@lru_cache(maxsize=None)
def subset_arrays(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images N×28×28, labels N) of ``split`` of the embedded subset as stored, read once per process."""
    if split not in SPLITS:
        raise MimbenchError(f"Unknown split {split!r} of builtin:fashion-mnist.", f"Use one of {', '.join(SPLITS)}.")
    if not SUBSET_FILE.is_file():
        raise MimbenchError(f"The embedded data file {SUBSET_FILE} is missing from the installation.",
                            "Reinstall mimbench (pip install -e .) or rebuild it with scripts/build_fashion_mnist_subset.py.")
    with np.load(SUBSET_FILE) as data:
        return torch.from_numpy(data[f"{split}_images"].copy()), torch.from_numpy(data[f"{split}_labels"].copy())


def resize_grey(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """uint8 N×28×28 → float N×1×S×S in [0, 1]: zero-pad to 32, else bicubic resize (clamped)."""
    x = images.float().div_(255).unsqueeze(1)
    if img_size == 32:
        return F.pad(x, (2, 2, 2, 2))
    if img_size == 28:
        return x
    return F.interpolate(x, size=(img_size, img_size), mode="bicubic", align_corners=False).clamp_(0, 1)


class FashionMNISTSubset(Dataset):
    """The embedded subset as a torch dataset: ``(FloatTensor 3×S×S normalised, int label)``.

    ``transform=None`` takes the fast tensor path described in the module docstring; a user
    ``transform`` receives the 28×28 image as a PIL RGB image and must return a tensor.
    ``images`` (uint8 N×28×28) and ``labels`` (int64 N) expose the raw data for batched augmentation.
    """

    classes = list(FASHION_MNIST_CLASSES)
    mean = FASHION_MNIST_MEAN
    std = FASHION_MNIST_STD

    def __init__(self, split: str = "train", img_size: int = 32, transform=None) -> None:
        if img_size < 8:
            raise MimbenchError(f"img_size={img_size} is too small for builtin:fashion-mnist.", "Use 28, 32 or larger.")
        self.split, self.img_size, self.transform = split, img_size, transform
        self.images, self.labels = subset_arrays(split)
        self.targets = self.labels.tolist()
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        label = int(self.labels[index])
        if self.transform is not None:
            return self.transform(Image.fromarray(self.images[index].numpy()).convert("RGB")), label
        x = resize_grey(self.images[index: index + 1], self.img_size)[0].expand(3, -1, -1)
        return (x - self._mean) / self._std, label
