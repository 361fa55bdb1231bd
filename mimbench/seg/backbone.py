"""Encoder files -> mmsegmentation ``MAE`` backbone weights.

mmseg's ``MAE`` backbone is a BEiT-style ViT: the same patch embedding, blocks
and absolute position embedding as timm's ``VisionTransformer`` plus a
relative position bias per block (zero-initialised, so a converted encoder
starts out computing exactly what it computed in pre-training) and layer-scale
vectors ``gamma_1``/``gamma_2`` (the protocol's ``init_values=1.0`` makes them
the identity for encoders without layer scale). Key mapping, timm -> mmseg::

    patch_embed.proj.*     -> patch_embed.projection.*
    blocks.i.norm1/norm2.* -> layers.i.ln1/ln2.*
    blocks.i.attn.*        -> layers.i.attn.*          (qkv with bias, proj)
    blocks.i.mlp.fc1/fc2.* -> layers.i.ffn.layers.0.0/ffn.layers.1.*
    blocks.i.ls1/ls2.gamma -> layers.i.gamma_1/gamma_2 (only for layer-scale encoders)
    norm.*                 -> dropped (the backbone runs with final_norm=False,
                              as in the MAE segmentation protocol)
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mimbench.atomic import atomic_write
from mimbench.errors import MimbenchError

_BLOCK_RULES = (
    (re.compile(r"^blocks\.(\d+)\.norm1\.(weight|bias)$"), r"layers.\1.ln1.\2"),
    (re.compile(r"^blocks\.(\d+)\.norm2\.(weight|bias)$"), r"layers.\1.ln2.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)$"), r"layers.\1.attn.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$"), r"layers.\1.ffn.layers.0.0.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$"), r"layers.\1.ffn.layers.1.\2"),
    (re.compile(r"^blocks\.(\d+)\.ls1\.gamma$"), r"layers.\1.gamma_1"),
    (re.compile(r"^blocks\.(\d+)\.ls2\.gamma$"), r"layers.\1.gamma_2"),
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"patch_embed.projection.\1"),
    (re.compile(r"^(cls_token|pos_embed)$"), r"\1"),
)
_DROPPED = re.compile(r"^norm\.(weight|bias)$")


def timm_to_mmseg_mae(state_dict: dict[str, torch.Tensor], grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Rename a timm-layout ViT encoder state dict to mmseg ``MAE`` backbone keys.

    Args:
        state_dict: encoder tensors in timm ``VisionTransformer`` layout (one class token).
        grid: target patch grid (H/patch, W/patch); when it differs from the encoder's,
            the absolute position embedding (1 x (1 + h*w) x D) is resampled bicubically
            with timm's ``resample_abs_pos_embed`` (class token kept).

    Raises MimbenchError naming tensors that have no counterpart in the backbone.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if _DROPPED.match(key):
            continue
        for pattern, target in _BLOCK_RULES:
            if pattern.match(key):
                out[pattern.sub(target, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise MimbenchError(
            f"Encoder tensors {sorted(unknown)[:8]} have no counterpart in the mmseg MAE backbone.",
            "Segmentation supports plain ViT encoders with a class token (mimbench encoder files); "
            "convert the checkpoint with `mimbench convert` first.",
        )
    if "pos_embed" in out and grid is not None:
        from timm.layers import resample_abs_pos_embed

        num_patches = out["pos_embed"].shape[1] - 1
        side = int(round(num_patches**0.5))
        if side * side != num_patches:
            raise MimbenchError(
                f"Position embedding with {num_patches} patch positions is not a square grid.",
                "Only encoders pre-trained on square images are supported.",
            )
        if (side, side) != tuple(grid):
            out["pos_embed"] = resample_abs_pos_embed(
                out["pos_embed"], new_size=list(grid), old_size=[side, side], num_prefix_tokens=1
            )
    return out


def backbone_cfg_from_metadata(meta: dict[str, str], img_size: int) -> dict:
    """mmseg ``MAE`` backbone fields that must match the encoder (sizes from its metadata)."""
    try:
        fields = dict(
            patch_size=int(meta["patch_size"]),
            embed_dims=int(meta["embed_dim"]),
            num_layers=int(meta["depth"]),
            num_heads=int(meta["num_heads"]),
            mlp_ratio=float(meta.get("mlp_ratio", 4.0)),
            img_size=(img_size, img_size),
        )
    except (KeyError, ValueError) as err:
        raise MimbenchError(
            f"Encoder metadata lacks a valid architecture field ({err}).",
            "Use an encoder file written by mimbench (pretrain or `mimbench convert`).",
        ) from err
    # mmseg sizes the MLP as mlp_ratio * embed_dims without rounding, so the ratio must be integral.
    if not fields["mlp_ratio"].is_integer():
        raise MimbenchError(
            f"mmseg's MAE backbone cannot build an MLP ratio of {fields['mlp_ratio']}.",
            "Segmentation supports encoders with an integer mlp_ratio (4 for standard ViTs).",
        )
    fields["mlp_ratio"] = int(fields["mlp_ratio"])
    return fields


def write_backbone_checkpoint(encoder: Path, dst: Path, img_size: int) -> tuple[Path, dict]:
    """Convert the encoder file into a tensors-only backbone checkpoint for ``init_cfg=Pretrained``.

    Returns the written path and the backbone config fields (:func:`backbone_cfg_from_metadata`).
    """
    from safetensors.torch import load_file

    from mimbench.encoders import read_metadata

    meta = read_metadata(encoder)
    fields = backbone_cfg_from_metadata(meta, img_size)
    if img_size % fields["patch_size"]:
        raise MimbenchError(
            f"Segmentation crop {img_size} is not a multiple of the encoder patch size {fields['patch_size']}.",
            "Choose a crop size divisible by the patch size.",
        )
    grid = (img_size // fields["patch_size"],) * 2
    converted = timm_to_mmseg_mae(load_file(str(encoder)), grid=grid)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, lambda tmp: torch.save({"state_dict": converted}, tmp), what="the backbone checkpoint",
                 fix="Choose an output folder you can write to, with free disk space.")
    return dst, fields
