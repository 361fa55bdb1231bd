"""Frozen-encoder features for a dataset split, cached on disk.

A feature is read from the tokens after the encoder's final LayerNorm (timm ``forward_features(x)``), by
the pooling ``pool`` (:data:`mimbench.schema.POOLS`, ``--pool``): ``cls`` the class token (``[:, 0]``), ``avg``
the mean of the patch tokens (the class token and register tokens excluded), ``cls+avg`` both concatenated
(width 2D); ``auto`` (or unset) is the encoder family's pooling, from its metadata (:func:`resolve_pool`: the
class token, or the patch mean for encoders without class token such as I-JEPA; per task for the Eva family:
DINOv3 k-NN the class token, linear the class token ⊕ patch mean, EVA-02 the patch mean). By default it is the
class token (timm ``forward_features(x)[:, 0]``). An encoder whose final norm acts on pooled features (EVA-02 as
timm ships it: ``fc_norm``, no per-token ``norm``) has each pooled feature put through that norm, as timm's
``forward_head`` does (:data:`POOLED_NORM`; the record's readout says so). It is computed with the encoder in eval mode under
``torch.inference_mode`` and the evaluation's precision (``amp``: "auto" = bf16 autocast on CUDA and, for
encoders large enough to gain, on bf16-capable CPUs, :func:`mimbench.fastpath.precision_choice`); stored as
``(N, D)`` float32.

Other blocks (:class:`Readout`, the probes' ``layers``): any block, the last N blocks concatenated (DINOv2's
linear probe), the mean of several blocks (AIM), or every block at once (a depth sweep), each pooled as above.
Every block is read through the encoder's final norm, as DINOv2 reads its last four (:data:`BLOCK_NORM`), and
all blocks come from one forward pass per batch (hooks on the blocks).

Cache: ``<cache_dir>/<key>.features.npy`` (N×F float32) and ``<key>.labels.npy`` (N int64), read back as
read-only ``numpy`` memory maps. ``key`` is the sha256 of the encoder file's sha256, the data spec
(absolute path for folders), the split, the transform description, the image size and the sample limit,
the precision, and the pooling and blocks when they are not the default (:func:`feature_key`: the class token
of the last block keeps the key caches were written under before either was a choice), so a changed encoder, dataset, split,
pre-processing, precision or readout never reuses stale features. ``<key>.manifest.json`` is written last
and holds what the entry was built from (that spec plus a sha256 of the dataset's sample list - relative
paths, labels and file sizes for folders) and the shape, dtype and byte size of both arrays. An entry is read only when its manifest matches all of that; an incomplete (no manifest, killed
mid-write), truncated, stale (images added, removed or replaced) or malformed entry is rebuilt. Every file
goes through :mod:`mimbench.atomic`; ``np.load`` runs with ``allow_pickle=False``, so a cache file can
never run code.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T

from mimbench import dist, encoders
from mimbench.atomic import atomic_write, atomic_write_text
from mimbench.batching import shard_range
from mimbench.data import build_dataset, dataset_stats, draft_size, is_builtin, skipped_files
from mimbench.data.loading import loader_options
from mimbench.encoders.families import family_pool, has_class_token, pooled_final_norm
from mimbench.errors import MimbenchError
from mimbench.fastpath import Workload, autocast_factory, match_attention, resolve_amp
from mimbench.schema import AMP, LAYERS_SYNTAX, POOLS, layer_spec

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
    mean, std = dataset_stats(data)
    if is_builtin(data):
        return None, f"builtin-default(img_size={img_size},mean={mean},std={std})"

    resize = eval_resize(int(img_size))
    transform = T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
    return transform, f"resize{resize}-bicubic/centercrop{img_size}/normalize(mean={mean},std={std})"


#: What each pooling reads, as the run records say it.
FEATURE_READ = {"cls": "class token after final norm",
                "avg": "mean of the patch tokens after final norm (class and register tokens excluded)",
                "cls+avg": "class token after final norm ⊕ mean of the patch tokens after final norm "
                           "(register tokens excluded)"}
#: The same for an encoder whose final norm acts on pooled features (timm ``fc_norm``: EVA-02 as timm ships it).
POOLED_NORM_READ = {"cls": "class token, then the final norm of pooled features (fc_norm)",
                    "avg": "mean of the patch tokens, then the final norm of pooled features (fc_norm; class and "
                           "register tokens excluded)",
                    "cls+avg": "class token ⊕ mean of the patch tokens, each then the final norm of pooled features "
                               "(fc_norm; register tokens excluded)"}
#: Cache-key names of the poolings of the last block ("cls" keeps the key of caches written before pooling was
#: a choice).
_FEATURE_KEY = {"cls": "cls-after-final-norm", "avg": "patch-mean-after-final-norm",
                "cls+avg": "cls+patch-mean-after-final-norm"}


def _no_class_token(where: str, pool: str) -> MimbenchError:
    return MimbenchError(f"{where} has no class token, so pool {pool!r} cannot read one.",
                         "Use --pool avg (the mean of the patch tokens) or auto.")


def resolve_pool(pool: str | None, meta: dict, where: str = "encoder", task: str | None = None) -> str:
    """``pool`` (one of :data:`mimbench.schema.POOLS`, or None) for an encoder with metadata ``meta``: "auto" and
    None become the encoder family's pooling for ``task`` (:func:`mimbench.encoders.families.family_pool`: the
    Eva family's per-task pooling - DINOv3 k-NN "cls", linear "cls+avg", EVA-02 "avg" -, else "avg" when the
    metadata says ``global_pool=avg``, as for encoders without class token, else "cls"); a class-token pooling of
    an encoder without one is an error."""
    if pool is not None and pool not in POOLS:
        raise MimbenchError(f"pool = {pool!r} is not a pooling.", f"Use one of: {', '.join(POOLS)}.")
    if pool in (None, "auto"):
        pool = family_pool(meta, task, where)
    if pool != "avg" and not has_class_token(meta, where):
        raise _no_class_token(where, pool)
    return pool


def pooled_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm an encoder's file applies to pooled features, when its final norm acts on them instead of on every
    token (metadata ``final_norm=pooled``: EVA-02 as timm ships it; timm's ``fc_norm``); None otherwise, also for
    a timm model built with a fresh ``fc_norm`` of its own (not part of the encoder's features)."""
    if getattr(model, "mimbench_metadata", {}).get("final_norm") != "pooled":
        return None
    return getattr(model, "fc_norm", None)


def pool_tokens(model: torch.nn.Module, tokens: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """Features (N×D, N×2D for "cls+avg") of ``tokens`` N×T×D (``model.forward_features`` output, or a block's
    tokens through the final norm) by a resolved ``pool``: the class token (index 0), the mean of the patch
    tokens - those after the model's ``num_prefix_tokens`` (class token, registers) -, or both concatenated.
    A model whose final norm acts on pooled features (:func:`pooled_norm`) has each pooled feature normed."""
    norm = pooled_norm(model) or torch.nn.Identity()
    if pool == "cls":
        return norm(tokens[:, 0])
    mean = norm(tokens[:, int(getattr(model, "num_prefix_tokens", 1)):].mean(dim=1))
    return mean if pool == "avg" else torch.cat([norm(tokens[:, 0]), mean], dim=-1)


def data_identity(data: str) -> str:
    """The data spec as it enters the cache key: builtin names as is, folders by absolute path."""
    return data if is_builtin(data) else str(Path(data).resolve())


def cache_key(*, encoder_sha: str, data: str, split: str, transform_desc: str, img_size: int,
              limit: int | None, precision: str = "none", feature: str | dict | None = None) -> str:
    """The cache entry's name; ``feature`` (:func:`feature_key`) only for a feature other than the default
    class token after the final norm, so that the default's key stays the one caches were written under."""
    spec = {"encoder": encoder_sha, "data": data_identity(data), "split": split, "transform": transform_desc,
            "img_size": int(img_size), "limit": limit, "feature": _FEATURE_KEY["cls"]}
    if feature is not None:
        spec["feature"] = feature
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


# ---------------------------------------------------------------------------- which blocks and tokens are read
#: How a block other than the last is read: through the encoder's final norm, as DINOv2's
#: ``get_intermediate_layers(norm=True)`` (and timm's ``forward_intermediates(norm=True)``) read theirs.
BLOCK_NORM = "final norm applied to every block read"
#: The same for an encoder whose final norm acts on pooled features (``fc_norm``: EVA-02 as timm ships it).
POOLED_NORM = "final norm (fc_norm) applied to the pooled features of every block read"


@dataclass(frozen=True)
class Readout:
    """The blocks (0-based, in order) and the pooling a feature is read from.

    ``combine``: ``single`` (one block), ``concat`` (the blocks' pooled features side by side), ``mean`` (the
    mean of the blocks' tokens, then pooled) or ``all`` (every block, kept apart: a row holds the blocks' pooled
    features one after the other, block 0 first). ``pool``: ``cls`` (class token), ``avg`` (mean of the patch
    tokens; class and register tokens - timm's ``num_prefix_tokens`` - left out) or ``cls+avg`` (both,
    concatenated). ``depth``: the encoder's block count. ``pooled_norm``: the encoder's final norm acts on the
    pooled features (:func:`pooled_norm`), not on every token.
    """

    spec: str
    combine: str
    blocks: tuple[int, ...]
    pool: str
    depth: int
    pooled_norm: bool = False

    @property
    def last_block(self) -> bool:
        """Only the last block is read (``forward_features``' output), pooled by ``pool``."""
        return self.combine == "single" and self.blocks == (self.depth - 1,)

    @property
    def is_default(self) -> bool:
        """The class token after the final norm: today's feature, computed as :func:`compute_features` always has."""
        return self.last_block and self.pool == "cls" and not self.pooled_norm

    @property
    def groups(self) -> int:
        """How many features of one block's width a row holds (``all``: one per block)."""
        return len(self.blocks) if self.combine in ("concat", "all") else 1

    def width(self, embed_dim: int) -> int:
        """F, the length of a feature row, for blocks of width ``embed_dim``."""
        return embed_dim * self.groups * (2 if self.pool == "cls+avg" else 1)

    def describe(self) -> dict:
        """What the record says about the feature."""
        return {"layers": self.spec, "combine": self.combine, "blocks": list(self.blocks), "pool": self.pool,
                "norm": POOLED_NORM if self.pooled_norm else BLOCK_NORM}


def _layer_error(value, why: str) -> MimbenchError:
    return MimbenchError(f"layers = {value!r} {why}.", f"Use {LAYERS_SYNTAX}.")


def _block(i: int, depth: int, value) -> int:
    if not -depth <= i < depth:
        raise _layer_error(value, f"names block {i}, but the encoder has {depth} blocks (0..{depth - 1})")
    return i % depth


def resolve_layers(value, depth: int) -> tuple[str, tuple[int, ...]]:
    """``(combine, blocks)`` of a ``layers`` value (:data:`mimbench.schema.LAYERS_SYNTAX`) for an encoder of
    ``depth`` blocks; MimbenchError listing the syntax on a malformed value or a block the encoder lacks."""
    parsed = layer_spec(value)
    if parsed is None:
        raise _layer_error(value, "is not a layer selection")
    form, numbers = parsed
    if form == "last":
        return "single", (depth - 1,)
    if form == "all":
        return "all", tuple(range(depth))
    if form == "block":
        return "single", (_block(numbers[0], depth, value),)
    if form == "concat":
        if numbers[0] > depth:
            raise _layer_error(value, f"asks for the last {numbers[0]} blocks of an encoder with {depth}")
        return "concat", tuple(range(depth - numbers[0], depth))
    return "mean", tuple(_block(i, depth, value) for i in numbers)


def readout(encoder: Path, layers="last", pool: str | None = None, layout: str = "auto",
            task: str | None = None) -> Readout:
    """The :class:`Readout` of ``layers`` and ``pool`` (:func:`resolve_pool`; None / "auto": the encoder family's
    for ``task``) for ``encoder``, checked before any feature is computed."""
    meta = encoders.read_metadata(encoder, layout=layout)
    pool = resolve_pool(pool, meta, str(encoder), task=task)
    combine, blocks = resolve_layers(layers, int(meta["depth"]))
    return Readout(str(layers), combine, blocks, pool, int(meta["depth"]), pooled_final_norm(meta, str(encoder)))


def feature_key(spec: Readout) -> str | dict | None:
    """What the cache key says about the feature: None for the default (class token of the last block), the
    pooling's name (:data:`_FEATURE_KEY`) for another pooling of the last block, the readout otherwise."""
    if spec.is_default:
        return None
    return _FEATURE_KEY[spec.pool] if spec.last_block and not spec.pooled_norm else spec.describe()


def feature_read(spec: Readout) -> str:
    """What the record says the feature is (:data:`FEATURE_READ`, or :data:`POOLED_NORM_READ` for an encoder
    whose final norm acts on pooled features, and the blocks when not only the last)."""
    read = (POOLED_NORM_READ if spec.pooled_norm else FEATURE_READ)[spec.pool]
    if spec.last_block:
        return read
    return f"{read}, of blocks {list(spec.blocks)} ({spec.combine})"


def block_tokens(model: torch.nn.Module, images: torch.Tensor, blocks) -> list[torch.Tensor]:
    """Tokens (N×T×D) of each of ``blocks`` after the final norm, from one forward pass: the last block's are
    ``forward_features``' output, the others' are caught by hooks on ``model.blocks`` and go through ``model.norm``."""
    last = len(model.blocks) - 1
    caught: dict[int, torch.Tensor] = {}

    def keep(i, _module, _args, output):
        caught[i] = output

    hooks = [model.blocks[i].register_forward_hook(partial(keep, i)) for i in sorted(set(blocks)) if i != last]
    try:
        final = model.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    return [final if i == last else model.norm(caught[i]) for i in blocks]


def check_readout(model: torch.nn.Module, spec: Readout) -> None:
    """MimbenchError when ``model`` lacks the tokens ``spec`` pools."""
    if "cls" in spec.pool and getattr(model, "cls_token", None) is None:
        raise _no_class_token("This encoder", spec.pool)


def read_features(model: torch.nn.Module, images: torch.Tensor, spec: Readout) -> torch.Tensor:
    """Features (N×F) of ``images`` as ``spec`` reads them, from one forward pass (no grad / autocast here)."""
    if spec.is_default:
        return model.forward_features(images)[:, 0]
    if spec.last_block:
        return pool_tokens(model, model.forward_features(images), spec.pool)
    tokens = block_tokens(model, images, spec.blocks)
    if spec.combine == "mean":
        return pool_tokens(model, torch.stack(tokens).mean(dim=0), spec.pool)
    return torch.cat([pool_tokens(model, t, spec.pool) for t in tokens], dim=-1)


def compute_features(model: torch.nn.Module, loader, precision: str = "none",
                     spec: Readout | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features (N×F float32; default: the class token, F = D) and labels (N int64) of every batch of ``loader``,
    one forward pass per batch, under ``torch.inference_mode`` and autocast to ``precision`` (a resolved one:
    bf16 | fp16 | none); ``spec``: which blocks and tokens (:func:`read_features`)."""
    model.eval()
    device = next(model.parameters()).device
    autocast = autocast_factory(precision, device)
    feats, labels = [], []
    for images, targets in loader:
        with torch.inference_mode(), autocast():
            images = images.to(device, non_blocking=True)
            rows = model.forward_features(images)[:, 0] if spec is None else read_features(model, images, spec)
        feats.append(rows.float().cpu())
        labels.append(torch.as_tensor(targets, dtype=torch.int64))
    if not feats:
        raise MimbenchError("The dataset split is empty; no features to compute.", "Check the data path and split.")
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


CACHE_FIX = "Set cache_dir in the config (or --set cache_dir=...) to a writable folder with free space."


def dataset_fingerprint(dataset) -> str:
    """sha256 of what a split holds: for folders the relative path, label and byte size of every sample
    (so added, removed, relabelled or replaced images change it), for built-in data its length."""
    h = hashlib.sha256()
    samples = getattr(dataset, "samples", None)
    if samples is None:
        h.update(f"{type(dataset).__name__}:{len(dataset)}".encode())
        return h.hexdigest()
    root = Path(getattr(dataset, "root", "."))
    for path, label in samples:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = -1
        h.update(f"{os.path.relpath(path, root)}\t{label}\t{size}\n".encode())
    return h.hexdigest()


def _array_info(path: Path, array: np.ndarray) -> dict:
    return {"shape": list(array.shape), "dtype": str(array.dtype), "bytes": path.stat().st_size}


def _read_cache(feat_path: Path, label_path: Path, manifest_path: Path, built_from: dict):
    """(features, labels) memory maps when the entry is complete and was built from ``built_from``; else None."""
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("built_from") != built_from:
            return None
        feats = np.load(feat_path, mmap_mode="r", allow_pickle=False)
        labels = np.load(label_path, mmap_mode="r", allow_pickle=False)
        if (manifest.get("features") != _array_info(feat_path, feats)
                or manifest.get("labels") != _array_info(label_path, labels)
                or feats.ndim != 2 or labels.shape != (feats.shape[0],)):
            return None
        return feats, labels
    except (OSError, ValueError, AttributeError, TypeError):  # missing, truncated, not .npy, object arrays, ...
        return None


def _load_cache(feat_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of a written entry as read-only memory maps."""
    return (np.load(feat_path, mmap_mode="r", allow_pickle=False),
            np.load(label_path, mmap_mode="r", allow_pickle=False))


def _npy_writer(array: np.ndarray):
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
    return write


def _write_cache(feat_path: Path, label_path: Path, manifest_path: Path, built_from: dict, feats, labels) -> None:
    try:
        manifest_path.unlink(missing_ok=True)  # the old entry stops being valid before its arrays change
    except OSError as err:
        raise MimbenchError(f"Feature cache {manifest_path.parent} is not writable ({err.strerror or err}).",
                            CACHE_FIX) from None
    atomic_write(feat_path, _npy_writer(feats), what="the feature cache", fix=CACHE_FIX)
    atomic_write(label_path, _npy_writer(labels), what="the label cache", fix=CACHE_FIX)
    manifest = {"built_from": built_from, "features": _array_info(feat_path, feats),
                "labels": _array_info(label_path, labels)}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1), what="the feature-cache manifest", fix=CACHE_FIX)


@dataclass
class _Entry:
    """One cache entry: the split it is computed from, where its files go, and what it is built from."""

    dataset: Any
    img_size: int
    device: torch.device
    precision: str
    spec: Readout
    paths: tuple[Path, Path, Path]  # features, labels, manifest
    built_from: dict
    info: dict


def _entry(encoder: Path, data: str, split: str, *, cache_dir: Path, img_size: int | None, limit: int | None,
           device: torch.device, amp: str, max_bad_fraction: float | None, layout: str, spec: Readout,
           decode_draft: bool = False) -> _Entry:
    """The split of ``data`` at the evaluation's size and precision, and its cache entry's key, paths and spec."""
    meta = encoders.read_metadata(encoder, layout=layout)
    size = int(img_size or meta["img_size"])
    transform, desc = eval_transform(data, size)
    draft = draft_size(size) if decode_draft and not is_builtin(data) else None
    if draft:  # other pixels: another cache entry
        desc += f"/jpeg-draft{draft}"
    dataset = build_dataset(data, split, transform=transform, img_size=size, max_bad_fraction=max_bad_fraction,
                            decode_draft=draft)
    precision = resolve_amp(amp, device, Workload.of_arch(meta, train=False, img_size=size))
    enc_sha = encoders.encoder_sha256(encoder)
    feature = feature_key(spec)
    key = cache_key(encoder_sha=enc_sha, data=data, split=split, transform_desc=desc, img_size=size, limit=limit,
                    precision=precision, feature=feature)
    cache_dir = Path(cache_dir)
    paths = (cache_dir / f"{key}.features.npy", cache_dir / f"{key}.labels.npy", cache_dir / f"{key}.manifest.json")
    built_from = {"encoder_sha256": enc_sha, "data": data_identity(data), "split": split, "transform": desc,
                  "img_size": size, "limit": limit, "precision": precision,
                  "samples_sha256": dataset_fingerprint(dataset)}
    if feature is not None:  # a pooling of the last block by its name, other blocks by the readout
        built_from["feature" if isinstance(feature, str) else "readout"] = feature
    info = {"key": key, "transform": desc, "img_size": size, "classes": list(dataset.classes),
            "precision": precision, "skipped": skipped_files(dataset), "readout": spec.describe(),
            "pool": spec.pool, "feature": feature_read(spec)}
    return _Entry(dataset, size, device, precision, spec, paths, built_from, info)


def _compute_sharded(entry: _Entry, encoder: Path, ctx, *, limit: int | None, batch_size: int, num_workers: int,
                     layout: str, where: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """This rank's contiguous shard of the (limited) split through the encoder, gathered: all rows in dataset
    order on rank 0 (None on the others under several processes)."""
    model = encoders.load_encoder(encoder, img_size=entry.img_size, layout=layout).to(entry.device)
    check_readout(model, entry.spec)
    match_attention(model, entry.precision, entry.device)
    items = limited(entry.dataset, limit)
    if len(items) == 0:
        raise MimbenchError(f"The {where} is empty; no features to compute.", "Check the data path and split.")
    shard = torch.utils.data.Subset(items, shard_range(len(items), ctx.rank, ctx.world_size))
    if len(shard):
        loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, shuffle=False,
                                             **{**loader_options(num_workers, entry.device), "persistent_workers": False})
        feats, labels = compute_features(model, loader, entry.precision, entry.spec)
    else:  # more ranks than items
        feats, labels = np.zeros((0, entry.spec.width(int(model.num_features))), np.float32), np.zeros((0,), np.int64)
    if ctx.distributed:  # only rank 0 keeps a host copy (to write it); the others read the cache back
        feats = dist.gather_rows(torch.from_numpy(feats).to(ctx.device))
        labels = dist.gather_rows(torch.from_numpy(labels).to(ctx.device))
        feats, labels = (feats.cpu().numpy(), labels.cpu().numpy()) if ctx.is_main else (None, None)
    return feats, labels


def _publish(entry: _Entry, ctx, feats, labels):
    """Rank 0 writes the entry (arrays, then manifest); every rank returns the features and labels, the other
    ranks as memory maps of the written files (the ranks of a node share its pages)."""
    error = None
    if ctx.is_main:
        try:
            _write_cache(*entry.paths, entry.built_from, feats, labels)
        except MimbenchError as err:
            error = err
    if not dist.broadcast_flag(error is None):
        raise error or MimbenchError(f"Feature cache {entry.paths[0].parent} could not be written on rank 0.",
                                     CACHE_FIX)
    return _load_cache(*entry.paths[:2]) if ctx.distributed else (feats, labels)


def extract_features(encoder: Path, data: str, split: str, *, cache_dir: Path, img_size: int | None = None,
                     batch_size: int = 256, num_workers: int = 0, limit: int | None = None,
                     device: str | torch.device | None = None, amp: str = AMP.default,
                     max_bad_fraction: float | None = None, layout: str = "auto", layers="last",
                     pool: str | None = "auto", task: str | None = None,
                     decode_draft: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """Features, labels and info of ``split`` of ``data`` under ``encoder``; computed once, then loaded.

    Returns ``(features N×F float32, labels N int64, info)``; info has ``key``, ``cached`` (True when
    loaded from disk), ``transform``, ``img_size``, ``classes``, ``precision`` (resolved from ``amp`` on
    ``device``), ``skipped`` (broken files left out), ``readout`` (:meth:`Readout.describe`), ``pool`` (the
    resolved pooling) and ``feature`` (what was read, :func:`feature_read`).
    ``layers`` and ``pool`` choose the blocks and tokens (:func:`readout`; default: the last block pooled as the
    encoder family pools it for ``task``, "knn" or "linear" - the class token, F = D, or the patch mean for
    encoders without one; Eva: see :func:`resolve_pool`);
    ``layers="all"`` gives every block's feature in one row (F = depth × width, block 0 first), all from one
    forward pass per batch.
    Under several processes each rank computes a contiguous shard, the shards are gathered (every rank
    returns all N rows, in dataset order, as read-only memory maps of the cache), rank 0 writes the cache and
    its manifest and the others wait for it; whether the cache is valid is rank 0's decision, so all ranks
    take the same path. ``device`` defaults to the process's device (:func:`mimbench.dist.context`);
    ``layout``: the checkpoint layout of ``encoder`` (``--from``); ``decode_draft``: JPEGs decoded downscaled
    (:func:`mimbench.data.draft_size`; part of the cache key).
    """
    ctx = dist.setup()
    encoder = Path(encoder)
    encoders.check_encoder_file(encoder)
    entry = _entry(encoder, data, split, cache_dir=cache_dir, img_size=img_size, limit=limit, amp=amp,
                   device=torch.device(device) if device is not None else ctx.device,
                   max_bad_fraction=max_bad_fraction, layout=layout,
                   spec=readout(encoder, layers, pool, layout=layout, task=task), decode_draft=decode_draft)
    cached = _read_cache(*entry.paths, entry.built_from) if ctx.is_main else None
    if dist.broadcast_flag(cached is not None):
        if cached is None:  # rank 0 checked the entry against its manifest
            cached = _load_cache(*entry.paths[:2])
        return cached[0], cached[1], {**entry.info, "cached": True}
    feats, labels = _compute_sharded(entry, encoder, ctx, limit=limit, batch_size=batch_size, layout=layout,
                                     num_workers=num_workers, where=f"{split} split of {data}")
    feats, labels = _publish(entry, ctx, feats, labels)
    return feats, labels, {**entry.info, "cached": False}


def class_tokens(model: torch.nn.Module, images: torch.Tensor, autocast, grad_off=torch.inference_mode,
                 pool: str = "cls") -> torch.Tensor:
    """Features (N×D float32, after the encoder's final norm; by default the class token, else :func:`pool_tokens`
    by a resolved ``pool``) of ``images`` (N×3×S×S), as :func:`compute_features` computes them: under
    ``grad_off()`` and ``autocast()`` (a context factory, :func:`mimbench.fastpath.autocast_factory`)."""
    with grad_off(), autocast():
        tokens = model.forward_features(images)
    return pool_tokens(model, tokens, pool).float()
