"""Small random encoder files, for tests and for trying a pipeline end to end without any weights.

``write_tiny_encoder(path)`` saves a random-initialised timm ``VisionTransformer`` (by default embed 32,
depth 2, 2 heads, patch 8 on 32x32 images: about 30 k parameters) as a mimbench encoder file, the same
file ``pretrain`` exports and ``mimbench eval`` reads. The segmentation configs tap 4 blocks: use
``depth=4`` there. The weights depend only on ``seed``.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from mimbench.encoders.file import save_encoder


def tiny_vit(*, img_size: int = 32, patch_size: int = 8, embed_dim: int = 32, depth: int = 2, num_heads: int = 2,
             seed: int = 0) -> VisionTransformer:
    """A random-initialised timm ViT without a head (MAE's LayerNorm eps 1e-6), seeded by ``seed``."""
    torch.manual_seed(seed)
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=4.0, num_classes=0, qkv_bias=True,
                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))


def write_tiny_encoder(path, *, img_size: int = 32, patch_size: int = 8, embed_dim: int = 32, depth: int = 2,
                       num_heads: int = 2, seed: int = 0, arch: str = "vit-test/8",
                       technique: str = "random-init") -> Path:
    """Save :func:`tiny_vit` with these sizes as an encoder file at ``path``; returns the path."""
    vit = tiny_vit(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                   seed=seed)
    return save_encoder(vit.state_dict(), path, arch=arch, img_size=img_size, patch_size=patch_size,
                        embed_dim=embed_dim, depth=depth, num_heads=num_heads, technique=technique)


__all__ = ["tiny_vit", "write_tiny_encoder"]
