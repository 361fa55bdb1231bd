"""Small random encoder files, for tests and for trying a pipeline end to end without any weights.

``write_tiny_encoder(path)`` saves a random-initialised timm ``VisionTransformer`` (by default embed 32,
depth 2, 2 heads, patch 8 on 32x32 images: about 30 k parameters) as a mimbench encoder file, the same
file ``pretrain`` exports and ``mimbench eval`` reads. The segmentation configs tap 4 blocks: use
``depth=4`` there. The weights depend only on ``seed``.

``write_seg_tree(root)`` writes a few random images and label maps in the ADE20K folder layout
(``images/{training,validation}/*.jpg``, ``annotations/{training,validation}/*.png``), enough for a
segmentation run of a few iterations. ``assert_same_state`` and ``log_losses`` compare two runs (a resumed one
against an uninterrupted one) state for state and logged loss for logged loss.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from mimbench.encoders.file import save_encoder


def tiny_vit(*, img_size: int = 32, patch_size: int = 8, embed_dim: int = 32, depth: int = 2, num_heads: int = 2,
             seed: int = 0, flags: Mapping | None = None) -> VisionTransformer:
    """A random-initialised timm ViT without a head (MAE's LayerNorm eps 1e-6), seeded by ``seed``. ``flags``:
    ViT-family metadata values (``class_token``, ``reg_tokens``, ``no_embed_class``, ``init_values``,
    ``global_pool``; :func:`mimbench.encoders.vit.vit_metadata` writes them into a file) as timm arguments."""
    flags = dict(flags or {})
    torch.manual_seed(seed)
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=4.0, num_classes=0, qkv_bias=True,
                             class_token=flags.get("class_token", True), reg_tokens=flags.get("reg_tokens", 0),
                             no_embed_class=flags.get("no_embed_class", False), init_values=flags.get("init_values"),
                             global_pool=flags.get("global_pool", "token"), fc_norm=False,
                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))


def write_tiny_encoder(path, *, img_size: int = 32, patch_size: int = 8, embed_dim: int = 32, depth: int = 2,
                       num_heads: int = 2, seed: int = 0, arch: str = "vit-test/8",
                       technique: str = "random-init") -> Path:
    """Save :func:`tiny_vit` with these sizes as an encoder file at ``path``; returns the path."""
    vit = tiny_vit(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                   seed=seed)
    return save_encoder(vit.state_dict(), path, arch=arch, img_size=img_size, patch_size=patch_size,
                        embed_dim=embed_dim, depth=depth, num_heads=num_heads, technique=technique)


def write_seg_encoder(path, **sizes) -> Path:
    """:func:`write_tiny_encoder` with the 4 blocks the segmentation configs tap (``arch="vit-d32x4/8"``)."""
    return write_tiny_encoder(path, **{"depth": 4, "arch": "vit-d32x4/8", "technique": "mae", **sizes})


def write_seg_tree(root, *, n: int = 4, n_val: int | None = None, sizes=((48, 48),), num_classes: int = 11,
                   name: str = "{i}", quality: int = 75, seed: int = 0) -> Path:
    """Random RGB images (JPEG) and label maps (PNG, labels ``0..num_classes-1``) in the ADE20K layout under
    ``root``: ``n`` training and ``n_val`` (default ``n``) validation pairs, image ``i`` of size
    ``sizes[i % len(sizes)]`` (h, w), file stem ``name.format(split=..., i=...)``; returns ``root``. The files
    depend only on the arguments."""
    root, rng = Path(root), np.random.default_rng(seed)
    for split, count in (("training", n), ("validation", n if n_val is None else n_val)):
        for sub in ("images", "annotations"):
            (root / sub / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            size, stem = tuple(sizes[i % len(sizes)]), name.format(split=split, i=i)
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
                root / "images" / split / f"{stem}.jpg", quality=quality)
            Image.fromarray(rng.integers(0, num_classes, size, dtype=np.uint8)).save(
                root / "annotations" / split / f"{stem}.png")
    return root


def perturb(model: torch.nn.Module, *, seed: int = 1, scale: float = 0.1) -> torch.nn.Module:
    """Add ``scale`` x N(0, 1) noise (global torch RNG seeded with ``seed``) to every parameter, in place, and set
    eval mode: zero-initialised tokens and tables or unit norms would hide a mis-mapped or dropped tensor."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def assert_same_state(a: Mapping, b: Mapping) -> None:
    """Two state dicts (or optimizer states) hold the same keys and bit-identical tensors."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def log_losses(path) -> list[tuple]:
    """``(it, loss, terms)`` of every line of a training loop's ``log.jsonl``."""
    return [(r["it"], r["loss"], r["terms"]) for r in map(json.loads, Path(path).read_text().splitlines())]


__all__ = ["assert_same_state", "log_losses", "perturb", "tiny_vit", "write_seg_encoder", "write_seg_tree", "write_tiny_encoder"]
