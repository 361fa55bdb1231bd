"""The ViT encoder family: timm's ``VisionTransformer`` as the MAE/DeiT ViTs are built.

An encoder file of this family (``family`` field absent or ``vit``) holds the state dict of a timm
``VisionTransformer`` without classifier head, in timm's key layout::

    cls_token                      (1, 1, D)
    pos_embed                      (1, 1 + (S/p)**2, D)   class position first, then the patch grid row-major
    patch_embed.proj.weight/bias   (D, C, p, p) / (D,)
    blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2 .weight/.bias
    norm.weight/bias               (D,)                     final per-token LayerNorm

The architecture is always the one of the MAE/DeiT ViTs: pre-norm blocks, LayerNorm eps 1e-6
(``norm_eps`` in the metadata when it differs), qkv bias, a class token, learned absolute position
embeddings that include the class position, no layer scale. The family has no metadata fields of
its own.
"""
from __future__ import annotations

from functools import partial
from typing import Mapping

import torch
from timm.models.vision_transformer import VisionTransformer

from mimbench.encoders.arch import mlp_hidden
from mimbench.encoders.resample import resample_pos_embed


def expected_shapes(*, img_size: int, patch_size: int, embed_dim: int, depth: int, mlp_ratio: float,
                    in_chans: int = 3) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a ViT encoder file with this architecture (timm VisionTransformer keys)."""
    d, h = embed_dim, mlp_hidden(embed_dim, mlp_ratio)
    grid = img_size // patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + grid * grid, d),
        "patch_embed.proj.weight": (d, in_chans, patch_size, patch_size),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    per_block = {
        "norm1.weight": (d,), "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,),
        "mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,),
        "mlp.fc2.weight": (d, h), "mlp.fc2.bias": (d,),
    }
    for i in range(depth):
        for name, shape in per_block.items():
            shapes[f"blocks.{i}.{name}"] = shape
    return shapes


def parse_vit_fields(meta: Mapping[str, str], where: str) -> dict:
    """The ViT family's own metadata fields: none."""
    return {}


def vit_shapes(arch: Mapping[str, float], flags: Mapping, in_chans: int = 3) -> dict[str, tuple[int, ...]]:
    """:func:`expected_shapes` from parsed metadata (:func:`mimbench.encoders.arch.parse_arch`)."""
    return expected_shapes(img_size=int(arch["img_size"]), patch_size=int(arch["patch_size"]),
                           embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]),
                           mlp_ratio=float(arch["mlp_ratio"]), in_chans=in_chans)


def build_vit(arch: Mapping[str, float], flags: Mapping, *, img_size, in_chans: int, norm_eps: float,
              **kwargs) -> VisionTransformer:
    """timm ``VisionTransformer`` with this architecture at ``img_size``; ``kwargs`` as load_encoder documents."""
    return VisionTransformer(img_size=img_size, patch_size=int(arch["patch_size"]), in_chans=in_chans,
                             embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]),
                             num_heads=int(arch["num_heads"]), mlp_ratio=float(arch["mlp_ratio"]), qkv_bias=True,
                             class_token=True, norm_layer=partial(torch.nn.LayerNorm, eps=norm_eps), **kwargs)


def resample_vit_state(state: dict[str, torch.Tensor], old_grid: int, new_grid) -> dict[str, torch.Tensor]:
    """Move the absolute position embedding from an ``old_grid`` square to ``new_grid`` (bicubic, class kept)."""
    out = dict(state)
    out["pos_embed"] = resample_pos_embed(state["pos_embed"], new_grid, (old_grid, old_grid))
    return out
