"""Pre-training input pipelines.

* ``builtin:fashion-mnist`` - the whole embedded subset is one uint8 tensor, so augmentation runs
  batched on tensors (no per-image PIL work, no workers): random resized crop with area scale
  (0.2, 1.0) and aspect ratio (3/4, 4/3) resampled bicubically to ``img_size``, horizontal flip
  with p=0.5, grey replicated to 3 channels, normalised with the subset's own mean/std.
  Crop boxes follow torchvision's ``RandomResizedCrop.get_params`` (10 tries in integer pixels,
  fallback to the whole image).
* an ImageNet-style folder - the official MAE pre-training transform:
  ``RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=bicubic)``, ``RandomHorizontalFlip``,
  ``ToTensor``, ``Normalize(ImageNet mean, std)``.

Both loaders draw the data order (and, for the tensor pipeline, the augmentation) from
``(seed, epoch)`` only, and shard it over ``world_size`` ranks, so a resumed run sees exactly the
batches of an uninterrupted one. Batches are ``(images N×3×S×S float32, labels N int64)``; labels
are never used by pre-training.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mimbench.errors import MimbenchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUILTIN_FMNIST = "builtin:fashion-mnist"


def random_resized_crop_boxes(n: int, height: int, width: int, generator: torch.Generator,
                              scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), tries: int = 10) -> torch.Tensor:
    """Crop boxes ``(top, left, h, w)`` (N×4 int64, pixels) sampled like torchvision's RandomResizedCrop."""
    area = height * width
    target = area * torch.empty(n, tries).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    u = torch.rand(n, tries, 2, generator=generator)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    idx = first.clamp(min=0)
    h_sel, w_sel = h[rows, idx], w[rows, idx]
    # uniform integer offset in [0, H - h] as torchvision's randint does
    top = torch.floor(u[rows, idx, 0] * (height - h_sel + 1).clamp(min=1)).long()
    left = torch.floor(u[rows, idx, 1] * (width - w_sel + 1).clamp(min=1)).long()
    fallback = first < 0  # square inputs: the fallback is the whole image
    h_sel = torch.where(fallback, torch.full_like(h_sel, height), h_sel)
    w_sel = torch.where(fallback, torch.full_like(w_sel, width), w_sel)
    top = torch.where(fallback, torch.zeros_like(top), top)
    left = torch.where(fallback, torch.zeros_like(left), left)
    return torch.stack([top, left, h_sel, w_sel], 1)


def crop_resize_flip(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image (N×C×H×W float) to its box, resize bicubically to ``size``, flip where ``flip``.

    One ``grid_sample`` for the whole batch: an affine map takes output pixel centres to the box
    in the source (align_corners=False geometry, as a per-image crop + resize would). Taps that fall
    just outside the box read the real neighbouring pixels rather than a replicated crop edge.
    """
    n, _, height, width = images.shape
    top, left, h, w = boxes.to(images.dtype).unbind(1)
    theta = torch.zeros(n, 2, 3, dtype=images.dtype)
    sx = w / width
    theta[:, 0, 0] = torch.where(flip, -sx, sx)
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, (n, images.shape[1], size, size), align_corners=False)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)


class TensorPretrainLoader:
    """Augmented batches from an in-memory uint8 image tensor (N×H×W grey or N×3×H×W).

    ``len()`` = batches per epoch (last partial batch dropped); ``set_epoch(e)`` fixes order and
    augmentation as a function of ``(seed, e)``; rank ``r`` of ``world_size`` takes every
    ``world_size``-th sample of the shuffled order.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, img_size: int,
                 mean, std, seed: int = 0, rank: int = 0, world_size: int = 1, scale=(0.2, 1.0)):
        if images.dtype != torch.uint8:
            raise MimbenchError(f"Expected uint8 images, got {images.dtype}.", "Pass the raw uint8 image tensor.")
        self.images = images if images.dim() == 4 else images[:, None]
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.batch_size, self.img_size, self.seed = int(batch_size), int(img_size), int(seed)
        self.rank, self.world_size, self.scale = int(rank), int(world_size), scale
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.epoch = 0
        self.per_rank = len(self.images) // self.world_size
        if len(self) < 1:
            raise MimbenchError(f"{len(self.images)} images give no full batch of {batch_size} per rank.",
                                "Lower optim.batch_size.")

    def __len__(self) -> int:
        return self.per_rank // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start: int):
        """The epoch's batches from batch ``start`` on (resume): skipped batches draw their crop
        boxes and flips (so later batches get the same ones) but are never resampled."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.images), generator=g)[self.rank::self.world_size][: self.per_rank]
        _, _, height, width = self.images.shape
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            boxes = random_resized_crop_boxes(len(idx), height, width, g, scale=self.scale)
            flip = torch.rand(len(idx), generator=g) < 0.5
            if b < start:
                continue
            x = self.images[idx].float().div_(255.0)
            x = crop_resize_flip(x, boxes, flip, self.img_size).clamp_(0.0, 1.0)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            yield (x - self.mean) / self.std, self.labels[idx]


def mae_pretrain_transform(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The official MAE pre-training transform (PIL image -> normalised 3×S×S tensor)."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def build_pretrain_loader(data: str, *, img_size: int, batch_size: int, seed: int = 0, rank: int = 0,
                          world_size: int = 1, num_workers: int = 0, limit: int | None = None,
                          max_bad_fraction: float | None = None):
    """Loader for pre-training on ``data`` (``builtin:fashion-mnist`` or an ImageNet-style root);
    ``limit`` keeps only the first ``limit`` training images (smoke tests, quick checks); folders skip
    broken files up to ``max_bad_fraction`` (``mimbench.data.image_folder``; ``loader.dataset``
    lists them through ``mimbench.data.skipped_files``)."""
    if data == BUILTIN_FMNIST:
        from mimbench.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNISTSubset

        ds = FashionMNISTSubset("train", img_size=img_size)
        mean, std = FASHION_MNIST_MEAN[:1], FASHION_MNIST_STD[:1]  # grey: one channel, replicated later
        images, labels = ds.images, torch.as_tensor(ds.labels)
        if limit:
            images, labels = images[: int(limit)], labels[: int(limit)]
        loader = TensorPretrainLoader(images, labels, batch_size=batch_size, img_size=img_size,
                                      mean=mean, std=std, seed=seed, rank=rank, world_size=world_size)
        return loader
    from torch.utils.data import DataLoader, DistributedSampler

    from mimbench.data import build_dataset

    ds = build_dataset(data, "train", transform=mae_pretrain_transform(img_size), img_size=img_size,
                       max_bad_fraction=max_bad_fraction)
    if limit:
        ds = torch.utils.data.Subset(ds, range(min(int(limit), len(ds))))
    # DistributedSampler also for one process: its order is a pure function of (seed, epoch).
    sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=num_workers > 0)
