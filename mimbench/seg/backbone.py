"""Encoders -> mmsegmentation backbone weights (``MAE`` for ViTs, ``BEiT`` for BEiT encoders without
absolute position embeddings, ``MAEStyleEva`` for Eva encoders: DINOv3, EVA-02).

mmseg's ``MAE`` backbone is a BEiT-style ViT: the same patch embedding, blocks
and absolute position embedding as timm's ``VisionTransformer`` plus a
relative position bias per block and layer-scale vectors ``gamma_1``/``gamma_2``.
For a ViT encoder the tables are written as zeros (what mmseg's MAE initialises
them to, so a converted encoder starts out computing exactly what it computed in
pre-training) and the gammas as ones (identity), independent of the config's
``init_values``. Key mapping, timm -> mmseg::

    patch_embed.proj.*     -> patch_embed.projection.*
    blocks.i.norm1/norm2.* -> layers.i.ln1/ln2.*
    blocks.i.attn.*        -> layers.i.attn.*          (qkv with bias, proj)
    blocks.i.mlp.fc1/fc2.* -> layers.i.ffn.layers.0.0/ffn.layers.1.*
    blocks.i.ls1/ls2.gamma -> layers.i.gamma_1/gamma_2 (only for layer-scale encoders)
    norm.*                 -> dropped (the backbone runs with final_norm=False,
                              as in the MAE segmentation protocol)

BEiT-family encoders (timm ``Beit``) keep their relative position bias and layer scale:

* without absolute position embeddings they go to mmseg's ``BEiT`` backbone (``qv_bias``:
  ``attn.q_bias``/``v_bias`` as they are, ``qkv`` without bias);
* with them, to mmseg's ``MAE`` backbone, the q/v biases joined into one qkv bias
  ``[q_bias, 0, v_bias]`` (BEiT's key bias is zero by construction);
* a shared table (``rel_pos_bias.relative_position_bias_table``) is copied into every layer, as
  the BEiT repository does when it fine-tunes such a checkpoint; a model without layer scale gets
  gammas of ones.

Eva-family encoders (timm ``Eva``) keep timm's blocks (:mod:`mimbench.seg.eva_backbone`): the keys stay
timm's with ``blocks.i`` -> ``layers.i`` and the final norm dropped; rotary embeddings are computed at the
input's grid by the backbone, so only an absolute ``pos_embed`` (EVA-02) is resampled here.

Position information is moved to the crop's patch grid here, with the one resampler of
:mod:`mimbench.encoders.resample`: absolute position embeddings bicubically (class position apart,
as mmseg's and MAE's own code), relative-position tables with BEiT's / mmseg's geometric-progression
rule. mmseg's own ``BEiT.resize_rel_pos_embed`` calls ``scipy.interpolate.interp2d``, which SciPy
removed, so the tables must arrive at the crop's size; mmseg then finds nothing to resize. The key
set written is checked against the backbone's own (mmseg loads ``init_cfg=Pretrained`` weights
non-strictly, which would otherwise hide a missing tensor).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mimbench.atomic import atomic_write
from mimbench.encoders import open_encoder
from mimbench.encoders.arch import norm_eps, parse_arch
from mimbench.encoders.eva import EVA_FIELDS, resample_eva_state
from mimbench.encoders.families import family_flags
from mimbench.encoders.resample import resample_pos_embed, resize_rel_pos_table
from mimbench.encoders.vit import resample_vit_state
from mimbench.errors import MimbenchError
from mimbench.seg.vit_backbone import MAE_STYLE_VIT, mae_style_keys, needs_token_backbone, token_fields, vit_to_mae_style

_BLOCK_RULES = (
    (re.compile(r"^blocks\.(\d+)\.norm1\.(weight|bias)$"), r"layers.\1.ln1.\2"),
    (re.compile(r"^blocks\.(\d+)\.norm2\.(weight|bias)$"), r"layers.\1.ln2.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)$"), r"layers.\1.attn.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.attn\.(q_bias|v_bias|relative_position_bias_table)$"), r"layers.\1.attn.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$"), r"layers.\1.ffn.layers.0.0.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$"), r"layers.\1.ffn.layers.1.\2"),
    (re.compile(r"^blocks\.(\d+)\.ls1\.gamma$"), r"layers.\1.gamma_1"),
    (re.compile(r"^blocks\.(\d+)\.ls2\.gamma$"), r"layers.\1.gamma_2"),
    (re.compile(r"^blocks\.(\d+)\.(gamma_1|gamma_2)$"), r"layers.\1.\2"),
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"patch_embed.projection.\1"),
    (re.compile(r"^(cls_token|pos_embed)$"), r"\1"),
)
_DROPPED = re.compile(r"^norm\.(weight|bias)$")
_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"


def _rename(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if _DROPPED.match(key) or key == _SHARED_TABLE:
            continue
        for pattern, target in _BLOCK_RULES:
            if pattern.match(key):
                out[pattern.sub(target, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise MimbenchError(
            f"Encoder tensors {sorted(unknown)[:8]} have no counterpart in the mmseg backbone.",
            "Segmentation takes mimbench encoders (ViT or BEiT family) or checkpoints of the supported layouts.",
        )
    return out


def _depth(state_dict) -> int:
    return len({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})


def timm_to_mmseg_mae(state_dict: dict[str, torch.Tensor], grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Rename a timm-layout ViT encoder state dict to mmseg ``MAE`` backbone keys.

    Args:
        state_dict: encoder tensors in timm ``VisionTransformer`` layout (one class token).
        grid: target patch grid (H/patch, W/patch); when it differs from the encoder's,
            the absolute position embedding (1 x (1 + h*w) x D) is resampled with
            :func:`mimbench.encoders.resample_pos_embed` (bicubic, class token kept).

    Raises MimbenchError naming tensors that have no counterpart in the backbone.
    """
    out = _rename(state_dict)
    if "pos_embed" in out and grid is not None:
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], tuple(grid))
    return out


def beit_to_mmseg(state_dict: dict[str, torch.Tensor], flags: dict, num_heads: int,
                  grid: tuple[int, int] | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(mmseg backbone type, weights) for a BEiT-family encoder (timm ``Beit`` keys), see the module docstring."""
    depth = _depth(state_dict)
    dim = state_dict["cls_token"].shape[-1]
    out = _rename(state_dict)
    backbone = "MAE" if flags["use_abs_pos_emb"] else "BEiT"
    if grid is not None and "pos_embed" in out:
        out["pos_embed"] = resample_pos_embed(out["pos_embed"], tuple(grid))
    shared = state_dict.get(_SHARED_TABLE)
    for i in range(depth):
        prefix = f"layers.{i}."
        table_key = prefix + "attn.relative_position_bias_table"
        if shared is not None:
            out[table_key] = shared.clone()
        if table_key in out and grid is not None:
            out[table_key] = resize_rel_pos_table(out[table_key], tuple(grid))
        if table_key not in out:  # no relative position bias: a zero table adds nothing
            side = grid[0] if grid is not None else None
            if side is None:
                raise MimbenchError("A BEiT encoder without relative position bias needs the target grid.",
                                    "Pass grid=(h, w).")
            out[table_key] = torch.zeros((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, num_heads)
        for g in ("gamma_1", "gamma_2"):
            out.setdefault(prefix + g, torch.ones(dim))
        if backbone == "MAE":
            q, v = out.pop(prefix + "attn.q_bias"), out.pop(prefix + "attn.v_bias")
            out[prefix + "attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return backbone, out


def vit_to_mmseg(state_dict: dict[str, torch.Tensor], meta: dict[str, str],
                 grid: tuple[int, int]) -> tuple[str, dict[str, torch.Tensor]]:
    """(``"MAE"``, weights) for a ViT-family encoder: :func:`timm_to_mmseg_mae` plus zero relative position
    bias and unit layer scale (or the encoder's layer scale), so the backbone computes exactly what the ViT did.
    The position grid moves by the encoder's ``pos_resample`` variant (DINOv2's for DINOv2 encoders). Encoders
    with register tokens or without a class token have no counterpart in mmseg's MAE backbone: refused."""
    _, flags = family_flags(meta, "encoder")
    if flags["reg_tokens"] or not flags["class_token"] or flags["no_embed_class"]:
        raise MimbenchError("Segmentation's ViT backbone (mmseg MAE) has one class token with a position and no "
                            "register tokens; this encoder has "
                            f"{flags['reg_tokens']} register tokens, class_token={flags['class_token']}.",
                            "Evaluate it with knn, linear or finetune; segmentation takes class-token ViTs.")
    stored = int(meta["img_size"]) // int(meta["patch_size"])
    state_dict = resample_vit_state(state_dict, stored, tuple(grid), flags)
    converted = timm_to_mmseg_mae(state_dict, grid=grid)
    heads, dim = int(meta["num_heads"]), int(meta["embed_dim"])
    rows = (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3
    for i in range(int(meta["depth"])):
        converted.setdefault(f"layers.{i}.attn.relative_position_bias_table", torch.zeros(rows, heads))
        converted.setdefault(f"layers.{i}.gamma_1", torch.ones(dim))
        converted.setdefault(f"layers.{i}.gamma_2", torch.ones(dim))
    return "MAE", converted


def vit_family_to_mmseg(state_dict: dict[str, torch.Tensor], meta: dict[str, str],
                        grid: tuple[int, int]) -> tuple[str, dict[str, torch.Tensor]]:
    """The ViT family's backbone: mmseg's ``MAE`` (:func:`vit_to_mmseg`) for class-token ViTs, ``MAEStyleViT``
    (:mod:`mimbench.seg.vit_backbone`: the encoder's own timm blocks) for those with registers or no class token."""
    if needs_token_backbone(family_flags(meta, "encoder")[1]):
        return vit_to_mae_style(state_dict, meta, grid)
    return vit_to_mmseg(state_dict, meta, grid)


def beit_encoder_to_mmseg(state_dict: dict[str, torch.Tensor], meta: dict[str, str],
                          grid: tuple[int, int]) -> tuple[str, dict[str, torch.Tensor]]:
    """:func:`beit_to_mmseg` with the flags and head count of a BEiT-family encoder's metadata."""
    _, flags = family_flags(meta, "encoder")
    return beit_to_mmseg(state_dict, flags, int(meta["num_heads"]), grid)


#: mmseg backbone of the Eva family (:mod:`mimbench.seg.eva_backbone`).
EVA_BACKBONE = "MAEStyleEva"
_EVA_DROPPED = re.compile(r"^(fc_)?norm\.(weight|bias)$")


def eva_to_mmseg(state_dict: dict[str, torch.Tensor], meta: dict[str, str],
                 grid: tuple[int, int]) -> tuple[str, dict[str, torch.Tensor]]:
    """(``"MAEStyleEva"``, weights) for an Eva-family encoder: timm ``Eva`` keys with ``blocks.i`` -> ``layers.i``,
    the final norm dropped, an absolute ``pos_embed`` resampled to ``grid`` (rotary embeddings need nothing)."""
    side = int(meta["img_size"]) // int(meta["patch_size"])
    state = resample_eva_state(state_dict, side, tuple(grid)) if tuple(grid) != (side, side) else state_dict
    return EVA_BACKBONE, {re.sub(r"^blocks\.", "layers.", k): v for k, v in state.items()
                          if not _EVA_DROPPED.match(k)}


def eva_backbone_keys(meta: dict[str, str]) -> set[str]:
    """The parameter names of :class:`mimbench.seg.eva_backbone.MAEStyleEva` for an Eva encoder's metadata."""
    family, flags = family_flags(meta, "encoder")
    shapes = family.shapes(parse_arch(meta, "encoder"), flags)
    return {re.sub(r"^blocks\.", "layers.", k) for k in shapes if not _EVA_DROPPED.match(k)}


def mmseg_builder(meta: dict[str, str]):
    """The function of this module the encoder's family entry names (``mmseg_backbone``):
    ``fn(state, meta, grid) -> (mmseg backbone type, weights)``."""
    family, _ = family_flags(meta, "encoder")
    if family.mmseg_backbone is None:
        raise MimbenchError(f"Segmentation does not support {family.name} encoders yet.",
                            "Use an encoder of a family with an mmseg backbone (vit, beit).")
    return globals()[family.mmseg_backbone]


def mmseg_backbone_type(meta: dict[str, str]) -> str:
    """mmseg's ``MAE`` backbone for encoders with absolute position embeddings, its ``BEiT`` backbone otherwise;
    ``MAEStyleViT`` for ViT-family encoders with registers or no class token."""
    family, flags = family_flags(meta, "encoder")
    if family.name == "eva":
        return EVA_BACKBONE
    if family.name == "vit" and needs_token_backbone(flags):
        return MAE_STYLE_VIT
    return "MAE" if "pos_embed" in family.shapes(parse_arch(meta, "encoder"), flags) else "BEiT"


def backbone_keys(backbone: str, depth: int) -> set[str]:
    """The parameter names of mmseg's ``MAE`` / ``BEiT`` backbone with ``final_norm=False`` (no buffers)."""
    keys = {"cls_token", "patch_embed.projection.weight", "patch_embed.projection.bias"}
    if backbone == "MAE":
        keys.add("pos_embed")
    attn = ("qkv.weight", "qkv.bias") if backbone == "MAE" else ("qkv.weight", "q_bias", "v_bias")
    for i in range(depth):
        p = f"layers.{i}."
        keys |= {p + n for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "gamma_1", "gamma_2",
                                 "attn.proj.weight", "attn.proj.bias", "attn.relative_position_bias_table",
                                 "ffn.layers.0.0.weight", "ffn.layers.0.0.bias", "ffn.layers.1.weight",
                                 "ffn.layers.1.bias")}
        keys |= {p + "attn." + n for n in attn}
    return keys


def backbone_cfg_from_metadata(meta: dict[str, str], img_size: int) -> dict:
    """mmseg backbone fields that must match the encoder: type (``MAE`` or ``BEiT``), sizes, LayerNorm eps."""
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
    fields["type"] = mmseg_backbone_type(meta)
    fields["norm_cfg"] = dict(type="LN", eps=norm_eps(meta))
    if fields["type"] == EVA_BACKBONE:  # timm's blocks: the MLP width as the encoder has it
        fields["eva"] = {k: meta[k] for k in EVA_FIELDS}
        return fields
    # mmseg sizes the MLP as mlp_ratio * embed_dims without rounding, so the ratio must be integral
    # (MAEStyleViT builds timm's blocks, which size it as the encoder does: DINOv2 giant's SwiGLU 2h / D)
    if not fields["mlp_ratio"].is_integer() and fields["type"] != MAE_STYLE_VIT:
        raise MimbenchError(
            f"mmseg's MAE backbone cannot build an MLP ratio of {fields['mlp_ratio']}.",
            "Segmentation supports encoders with an integer mlp_ratio (4 for standard ViTs).",
        )
    fields["mlp_ratio"] = int(fields["mlp_ratio"]) if fields["mlp_ratio"].is_integer() else fields["mlp_ratio"]
    if fields["type"] == MAE_STYLE_VIT:  # which prefix tokens and layer scale the encoder's blocks come with
        fields["tokens"] = token_fields(family_flags(meta, "encoder")[1])
    return fields


def encoder_to_backbone(state: dict[str, torch.Tensor], meta: dict[str, str], img_size: int) -> tuple[dict, dict]:
    """(backbone config fields, mmseg backbone weights at the crop's patch grid) of an encoder, key set checked."""
    fields = backbone_cfg_from_metadata(meta, img_size)
    if img_size % fields["patch_size"]:
        raise MimbenchError(
            f"Segmentation crop {img_size} is not a multiple of the encoder patch size {fields['patch_size']}.",
            "Choose a crop size divisible by the patch size.",
        )
    grid = (img_size // fields["patch_size"],) * 2
    depth = fields["num_layers"]
    backbone, converted = mmseg_builder(meta)(state, meta, grid)
    assert backbone == fields["type"]
    if backbone == EVA_BACKBONE:
        want = eva_backbone_keys(meta)
    else:
        want = mae_style_keys(meta) if backbone == MAE_STYLE_VIT else backbone_keys(backbone, depth)
    if set(converted) != want:
        raise MimbenchError(
            f"The converted weights do not fill mmseg's {backbone} backbone exactly (missing: "
            f"{sorted(want - set(converted))[:6]}; unexpected: {sorted(set(converted) - want)[:6]}).",
            "This is a bug in the conversion; please report it with the encoder's metadata (mimbench info).")
    return fields, converted


def write_backbone_checkpoint(encoder: Path, dst: Path, img_size: int, layout: str = "auto") -> tuple[Path, dict]:
    """Convert the encoder (file or checkpoint) into a tensors-only backbone checkpoint for ``init_cfg=Pretrained``.

    Returns the written path and the backbone config fields (:func:`backbone_cfg_from_metadata`).
    """
    state, meta = open_encoder(encoder, layout)
    fields, converted = encoder_to_backbone(state, meta, img_size)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, lambda tmp: torch.save({"state_dict": converted}, tmp), what="the backbone checkpoint",
                 fix="Choose an output folder you can write to, with free disk space.")
    return dst, fields
