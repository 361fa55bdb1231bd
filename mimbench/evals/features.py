"""Frozen-encoder features for a dataset split, cached on disk.

A feature is the class token after the encoder's final LayerNorm (timm ``forward_features(x)[:, 0]``),
computed with the encoder in eval mode under ``torch.inference_mode`` and the evaluation's precision
(``amp``: "auto" = bf16 autocast on CUDA and bf16-capable CPUs, :func:`mimbench.fastpath.resolve_amp`);
stored as ``(N, D)`` float32.

Cache: ``<cache_dir>/<key>.features.npy`` (N×D float32) and ``<key>.labels.npy`` (N int64), read back as
read-only ``numpy`` memory maps. ``key`` is the sha256 of the encoder file's sha256, the data spec
(absolute path for folders), the split, the transform description, the image size and the sample limit,
and the precision, so a changed encoder, dataset, split, pre-processing or precision never reuses stale
features. Files are written to a temporary name and renamed, so an interrupted extraction leaves no
partial cache entry.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from mimbench.errors import MimbenchError

#: Eval-time resize for folders, as MAE's ``main_finetune.build_transform``: up to 224 the shorter side goes to
#: ``int(img_size / (224 / 256))`` (256 for 224, as DINO's k-NN and MAE's linear probe), above 224 the crop
#: ratio is 1 (resize to img_size); then a centre crop of img_size.
CROP_RATIO = 224 / 256


def eval_resize(img_size: int) -> int:
    """Shorter-side resize before the centre crop of ``img_size`` (see :data:`CROP_RATIO`)."""
    return int(img_size / CROP_RATIO) if img_size <= 224 else int(img_size)


def eval_transform(data: str, img_size: int):
    """(transform or None, description) of the deterministic evaluation pre-processing for ``data``.

    Built-in data uses its own tensor path (``transform=None``: pad/resize + the subset's statistics);
    folders use Resize(eval_resize(img_size), bicubic) + CenterCrop(img_size) + ImageNet normalisation.
    """
    from mimbench.data import dataset_stats, is_builtin

    mean, std = dataset_stats(data)
    if is_builtin(data):
        return None, f"builtin-default(img_size={img_size},mean={mean},std={std})"
    from torchvision import transforms as T

    resize = eval_resize(int(img_size))
    transform = T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
    return transform, f"resize{resize}-bicubic/centercrop{img_size}/normalize(mean={mean},std={std})"


def data_identity(data: str) -> str:
    """The data spec as it enters the cache key: builtin names as is, folders by absolute path."""
    from mimbench.data import is_builtin

    return data if is_builtin(data) else str(Path(data).resolve())


def cache_key(*, encoder_sha: str, data: str, split: str, transform_desc: str, img_size: int,
              limit: int | None, precision: str = "none") -> str:
    spec = {"encoder": encoder_sha, "data": data_identity(data), "split": split, "transform": transform_desc,
            "img_size": int(img_size), "limit": limit, "feature": "cls-after-final-norm"}
    if precision != "none":  # fp32 keys stay those of caches written before precision was a choice
        spec["precision"] = precision
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def limited(dataset, limit: int | None):
    """The first ``limit`` samples of ``dataset`` (all when None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit <= 0:
        raise MimbenchError(f"Sample limit {limit} must be positive.", "Use a positive data.limit or None.")
    return torch.utils.data.Subset(dataset, range(int(limit)))


def compute_features(model: torch.nn.Module, loader, precision: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """Class-token features (N×D float32) and labels (N int64) of every batch of ``loader``, under
    ``torch.inference_mode`` and autocast to ``precision`` (a resolved one: bf16 | fp16 | none)."""
    from mimbench.fastpath import autocast_factory

    model.eval()
    device = next(model.parameters()).device
    autocast = autocast_factory(precision, device)
    feats, labels = [], []
    for images, targets in loader:
        with torch.inference_mode(), autocast():
            tokens = model.forward_features(images.to(device, non_blocking=True))
        feats.append(tokens[:, 0].float().cpu())
        labels.append(torch.as_tensor(targets, dtype=torch.int64))
    if not feats:
        raise MimbenchError("The dataset split is empty; no features to compute.", "Check the data path and split.")
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def extract_features(encoder: Path, data: str, split: str, *, cache_dir: Path, img_size: int | None = None,
                     batch_size: int = 256, num_workers: int = 0, limit: int | None = None,
                     device: str | torch.device | None = None, amp: str = "auto") -> tuple[np.ndarray, np.ndarray, dict]:
    """Features, labels and info of ``split`` of ``data`` under ``encoder``; computed once, then loaded.

    Returns ``(features N×D float32, labels N int64, info)``; info has ``key``, ``cached`` (True when
    loaded from disk), ``transform``, ``img_size``, ``classes`` and ``precision`` (resolved from ``amp``
    on ``device``). Under several processes each rank computes a contiguous shard, the shards are
    gathered (every rank returns all N rows, in dataset order), rank 0 writes the cache and the others
    wait for it; whether the cache is valid is rank 0's decision, so all ranks take the same path.
    ``device`` defaults to the process's device (:func:`mimbench.dist.context`).
    """
    from mimbench import dist
    from mimbench.batching import shard_range
    from mimbench.data import build_dataset
    from mimbench.encoders import check_encoder_file, encoder_sha256, load_encoder, read_metadata
    from mimbench.fastpath import resolve_amp

    ctx = dist.setup()
    encoder = Path(encoder)
    check_encoder_file(encoder)
    size = int(img_size or read_metadata(encoder)["img_size"])
    transform, desc = eval_transform(data, size)
    dataset = build_dataset(data, split, transform=transform, img_size=size)
    classes = list(dataset.classes)
    device = torch.device(device) if device is not None else ctx.device
    precision = resolve_amp(amp, device)
    key = cache_key(encoder_sha=encoder_sha256(encoder), data=data, split=split, transform_desc=desc,
                    img_size=size, limit=limit, precision=precision)
    cache_dir = Path(cache_dir)
    feat_path, label_path = cache_dir / f"{key}.features.npy", cache_dir / f"{key}.labels.npy"
    info = {"key": key, "transform": desc, "img_size": size, "classes": classes, "precision": precision}
    if dist.broadcast_flag(ctx.is_main and _valid_cache(feat_path, label_path)):
        feats, labels = np.load(feat_path, mmap_mode="r"), np.load(label_path, mmap_mode="r")
        return feats, labels, {**info, "cached": True}
    model = load_encoder(encoder, img_size=size).to(device)
    items = limited(dataset, limit)
    if len(items) == 0:
        raise MimbenchError(f"The {split} split of {data} is empty; no features to compute.",
                            "Check the data path and split.")
    shard = torch.utils.data.Subset(items, shard_range(len(items), ctx.rank, ctx.world_size))
    if len(shard):
        loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers, pin_memory=device.type == "cuda")
        feats, labels = compute_features(model, loader, precision)
    else:  # more ranks than items
        feats, labels = np.zeros((0, int(model.num_features)), np.float32), np.zeros((0,), np.int64)
    if ctx.distributed:
        feats = dist.gather_rows(torch.from_numpy(feats).to(ctx.device)).cpu().numpy()
        labels = dist.gather_rows(torch.from_numpy(labels).to(ctx.device)).cpu().numpy()
    error = None
    if ctx.is_main:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            _save_npy(feat_path, feats)
            _save_npy(label_path, labels)
        except OSError as err:
            error = err
    if not dist.broadcast_flag(error is None):
        raise MimbenchError(f"Feature cache {cache_dir} is not writable ({error or 'on rank 0'}).",
                            "Set cache_dir in the config (or --set cache_dir=...) to a writable folder.")
    return feats, labels, {**info, "cached": False}


def _valid_cache(feat_path: Path, label_path: Path) -> bool:
    """Both cache files exist and hold N×D features and N labels (an unreadable entry is recomputed)."""
    if not (feat_path.is_file() and label_path.is_file()):
        return False
    try:
        feats, labels = np.load(feat_path, mmap_mode="r"), np.load(label_path, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return feats.ndim == 2 and labels.shape == (feats.shape[0],)
