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

Both loaders take their data order from :class:`mimbench.batching.GlobalBatchSampler` (a function
of ``(seed, epoch)``; each optimizer step's images are the same on any number of processes, each
rank taking its slice) and draw each image's augmentation from ``(seed, epoch, image index)``
(:func:`mimbench.batching.uniform_by_index` for the tensor pipeline, per-item seeding through
:class:`mimbench.batching.SeededItems` for folders), so 1 and N processes - and a resumed run -
see exactly the same augmented images. Batches are ``(images N×3×S×S float32, labels N int64,
indices N int64)``; labels are never used by pre-training, indices seed per-image randomness
(the mask noise, see ``pretrain.main``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms as T

from mimbench.batching import GlobalBatchSampler, SeededItems, uniform_by_index
from mimbench.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNISTSubset, build_dataset, draft_size
from mimbench.data.loading import loader_options
from mimbench.errors import MimbenchError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUILTIN_FMNIST = "builtin:fashion-mnist"


def random_resized_crop_boxes(n: int, height: int, width: int, generator: torch.Generator | None = None,
                              scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), tries: int = 10,
                              uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Crop boxes ``(top, left, h, w)`` (N×4 int64, pixels) sampled like torchvision's RandomResizedCrop.

    The random numbers come from ``generator`` or, when given, from ``uniforms`` (N × 4·tries,
    uniform in [0, 1): per try area, log-ratio and two offsets), e.g. per-image numbers.
    """
    area = height * width
    if uniforms is None:
        target = area * torch.empty(n, tries).uniform_(scale[0], scale[1], generator=generator)
        log_r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
        u = torch.rand(n, tries, 2, generator=generator)
    else:
        if uniforms.shape != (n, 4 * tries):
            raise MimbenchError(f"uniforms has shape {tuple(uniforms.shape)}, expected ({n}, {4 * tries}).")
        uniforms = uniforms.double()
        target = area * (scale[0] + (scale[1] - scale[0]) * uniforms[:, :tries])
        lo, hi = math.log(ratio[0]), math.log(ratio[1])
        log_r = lo + (hi - lo) * uniforms[:, tries:2 * tries]
        u = uniforms[:, 2 * tries:].reshape(n, tries, 2)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
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

    ``len()`` = micro-batches per epoch on this rank (see :class:`mimbench.batching.GlobalBatchSampler`;
    the last partial global batch is dropped); ``set_epoch(e)`` selects the epoch. The crop box and
    flip of image ``i`` are functions of ``(seed, e, i)``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, img_size: int,
                 mean, std, seed: int = 0, rank: int = 0, world_size: int = 1, accum_iter: int = 1,
                 scale=(0.2, 1.0)):
        if images.dtype != torch.uint8:
            raise MimbenchError(f"Expected uint8 images, got {images.dtype}.", "Pass the raw uint8 image tensor.")
        self.images = images if images.dim() == 4 else images[:, None]
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.batch_size, self.img_size, self.seed = int(batch_size), int(img_size), int(seed)
        self.rank, self.world_size, self.scale = int(rank), int(world_size), scale
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.sampler = GlobalBatchSampler(len(self.images), batch_size, accum_iter, seed=seed, rank=rank,
                                          world_size=world_size)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, start: int):
        """The epoch's batches from micro-batch ``start`` on (resume): crops and flips are functions of
        ``(seed, epoch, index)``, so the skipped batches are neither loaded nor drawn."""
        _, _, height, width = self.images.shape
        epoch = self.epoch
        for chunk in self.sampler.iter_from(start):
            idx = torch.tensor(chunk, dtype=torch.int64)
            x = self.images[idx].float().div_(255.0)
            boxes = random_resized_crop_boxes(len(idx), height, width, scale=self.scale,
                                              uniforms=uniform_by_index(self.seed, epoch, idx, 40, "crop"))
            flip = uniform_by_index(self.seed, epoch, idx, 1, "flip")[:, 0] < 0.5
            x = crop_resize_flip(x, boxes, flip, self.img_size).clamp_(0.0, 1.0)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            yield (x - self.mean) / self.std, self.labels[idx], idx


def mae_pretrain_transform(img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The official MAE pre-training transform (PIL image -> normalised 3×S×S tensor)."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def build_pretrain_loader(data: str, *, img_size: int, batch_size: int, seed: int = 0, rank: int = 0,
                          world_size: int = 1, accum_iter: int = 1, num_workers: int = 0, limit: int | None = None,
                          max_bad_fraction: float | None = None, decode_draft: bool = False):
    """Loader for pre-training on ``data`` (``builtin:fashion-mnist`` or an ImageNet-style root);
    ``limit`` keeps only the first ``limit`` training images (smoke tests, quick checks); folders skip
    broken files up to ``max_bad_fraction`` (``mimbench.data.image_folder``; ``loader.dataset``
    lists them through ``mimbench.data.skipped_files``); ``decode_draft`` decodes JPEGs downscaled
    (``mimbench.data.draft_size``). Workers, pinned memory and prefetch follow the loader rule
    (:func:`mimbench.data.loading.loader_options`). The loader has ``set_epoch(e)`` (directly or
    on its batch sampler) and yields ``(images, labels, indices)``."""
    if data == BUILTIN_FMNIST:
        ds = FashionMNISTSubset("train", img_size=img_size)
        mean, std = FASHION_MNIST_MEAN[:1], FASHION_MNIST_STD[:1]  # grey: one channel, replicated later
        images, labels = ds.images, torch.as_tensor(ds.labels)
        if limit:
            images, labels = images[: int(limit)], labels[: int(limit)]
        return TensorPretrainLoader(images, labels, batch_size=batch_size, img_size=img_size, mean=mean, std=std,
                                    seed=seed, rank=rank, world_size=world_size, accum_iter=accum_iter)
    ds = build_dataset(data, "train", transform=mae_pretrain_transform(img_size), img_size=img_size,
                       max_bad_fraction=max_bad_fraction, decode_draft=draft_size(img_size) if decode_draft else None)
    if limit:
        ds = torch.utils.data.Subset(ds, range(min(int(limit), len(ds))))
    sampler = GlobalBatchSampler(len(ds), batch_size, accum_iter, seed=seed, rank=rank, world_size=world_size,
                                 with_epoch=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return DataLoader(SeededItems(ds, seed, stream="pretrain-augment"), batch_sampler=sampler,
                      **loader_options(num_workers, device))
