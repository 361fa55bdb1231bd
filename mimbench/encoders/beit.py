"""The BEiT encoder family: timm's ``Beit`` (relative position bias, layer scale), kept as what it is.

An encoder file with ``family=beit`` holds a timm ``timm.models.beit.Beit`` state dict without the
classifier head and without the ``relative_position_index`` buffers (timm rebuilds them; they are
not persistent there)::

    cls_token                                   (1, 1, D)
    pos_embed                                   (1, 1 + g*g, D)            only with use_abs_pos_emb
    patch_embed.proj.weight/bias                (D, C, p, p) / (D,)
    rel_pos_bias.relative_position_bias_table   ((2g-1)^2 + 3, H)          only with use_shared_rel_pos_bias
    blocks.{i}.norm1/norm2.weight/bias          (D,)
    blocks.{i}.attn.qkv.weight                  (3D, D)                    no bias: q and v biases apart,
    blocks.{i}.attn.q_bias / v_bias             (D,)                       the key bias is zero
    blocks.{i}.attn.relative_position_bias_table ((2g-1)^2 + 3, H)         only with use_rel_pos_bias
    blocks.{i}.attn.proj.weight/bias, mlp.fc1/fc2.weight/bias
    blocks.{i}.gamma_1 / gamma_2                (D,)                       only with layer scale
    norm.weight/bias                            (D,)                       final per-token LayerNorm

Its metadata adds, as strings, ``family=beit``, ``use_abs_pos_emb``, ``use_rel_pos_bias``,
``use_shared_rel_pos_bias`` ("true"/"false") and ``layer_scale_init_value`` (float repr,
"0.0" = no layer scale) to the fields every encoder file carries. LayerNorm eps is 1e-6
(``norm_eps`` in the metadata when it differs), qkv as above, GELU MLP, one class token.
"""
from __future__ import annotations

from functools import partial
from typing import Mapping

import torch
from timm.models.beit import Beit

from mimbench.encoders.arch import mlp_hidden
from mimbench.encoders.resample import resample_pos_embed, resize_rel_pos_table
from mimbench.errors import MimbenchError

#: Metadata fields of the BEiT family besides the common ones.
BEIT_FIELDS = ("use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias", "layer_scale_init_value")
_BOOL = {"true": True, "false": False}


def rel_table_rows(grid: int) -> int:
    """Rows of a relative-position-bias table for a g x g patch grid: (2g-1)^2 offsets + 3 class-token entries."""
    return (2 * grid - 1) ** 2 + 3


def parse_beit_flags(meta: Mapping[str, str], where: str) -> dict:
    """The BEiT fields of an encoder's metadata as Python values (bools and a float)."""
    out: dict = {}
    for k in BEIT_FIELDS[:3]:
        v = str(meta.get(k, "")).lower()
        if v not in _BOOL:
            raise MimbenchError(f"{where}: BEiT metadata field {k!r} is {meta.get(k)!r}, not 'true' or 'false'.",
                                "Re-export or re-convert the encoder.")
        out[k] = _BOOL[v]
    try:
        out["layer_scale_init_value"] = float(meta["layer_scale_init_value"])
    except (KeyError, ValueError):
        raise MimbenchError(f"{where}: BEiT metadata field 'layer_scale_init_value' is "
                            f"{meta.get('layer_scale_init_value')!r}, not a number.",
                            "Re-export or re-convert the encoder.") from None
    if out["use_rel_pos_bias"] and out["use_shared_rel_pos_bias"]:
        raise MimbenchError(f"{where}: both per-block and shared relative position bias are set.",
                            "A BEiT encoder has one or the other.")
    return out


def beit_metadata(flags: Mapping) -> dict[str, str]:
    """The BEiT fields as metadata strings (inverse of :func:`parse_beit_flags`)."""
    out = {k: "true" if bool(flags[k]) else "false" for k in BEIT_FIELDS[:3]}
    out["layer_scale_init_value"] = repr(float(flags["layer_scale_init_value"]))
    return out


def beit_expected_shapes(*, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                         mlp_hidden: int, flags: Mapping, in_chans: int = 3) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a BEiT-family encoder file with this architecture."""
    d, g = embed_dim, img_size // patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "patch_embed.proj.weight": (d, in_chans, patch_size, patch_size),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    if flags["use_abs_pos_emb"]:
        shapes["pos_embed"] = (1, 1 + g * g, d)
    if flags["use_shared_rel_pos_bias"]:
        shapes["rel_pos_bias.relative_position_bias_table"] = (rel_table_rows(g), num_heads)
    per_block = {
        "norm1.weight": (d,), "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d), "attn.q_bias": (d,), "attn.v_bias": (d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,),
        "mlp.fc1.weight": (mlp_hidden, d), "mlp.fc1.bias": (mlp_hidden,),
        "mlp.fc2.weight": (d, mlp_hidden), "mlp.fc2.bias": (d,),
    }
    if flags["use_rel_pos_bias"]:
        per_block["attn.relative_position_bias_table"] = (rel_table_rows(g), num_heads)
    if flags["layer_scale_init_value"] > 0:
        per_block["gamma_1"] = (d,)
        per_block["gamma_2"] = (d,)
    for i in range(depth):
        for name, shape in per_block.items():
            shapes[f"blocks.{i}.{name}"] = shape
    return shapes


def beit_shapes(arch: Mapping[str, float], flags: Mapping, in_chans: int = 3) -> dict[str, tuple[int, ...]]:
    """:func:`beit_expected_shapes` from parsed metadata (:func:`mimbench.encoders.arch.parse_arch`, flags)."""
    return beit_expected_shapes(img_size=int(arch["img_size"]), patch_size=int(arch["patch_size"]),
                                embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]),
                                num_heads=int(arch["num_heads"]),
                                mlp_hidden=mlp_hidden(int(arch["embed_dim"]), float(arch["mlp_ratio"])),
                                flags=flags, in_chans=in_chans)


def resample_beit_state(state: dict[str, torch.Tensor], old_grid: int, new_grid,
                        flags: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Move position information to ``new_grid``: pos_embed bicubic, relative tables as BEiT/mmseg do."""
    out = dict(state)
    for k, v in state.items():
        if k == "pos_embed":
            out[k] = resample_pos_embed(v, new_grid, (old_grid, old_grid))
        elif k.endswith("relative_position_bias_table"):
            out[k] = resize_rel_pos_table(v, new_grid, (old_grid, old_grid))
    return out


def build_beit(arch: Mapping[str, float], flags: Mapping, *, img_size, in_chans: int, norm_eps: float = 1e-6,
               **kwargs) -> Beit:
    """timm ``Beit`` with this architecture at ``img_size``; ``kwargs`` as load_encoder documents (ViT option names
    accepted).

    ``fc_norm`` (the ViT name) becomes Beit's ``use_fc_norm``; ``use_mean_pooling=True`` means
    ``global_pool="avg"`` (the BEiT repository's name for it).
    """
    if "fc_norm" in kwargs:
        kwargs["use_fc_norm"] = kwargs.pop("fc_norm")
    if kwargs.pop("use_mean_pooling", False):
        kwargs["global_pool"] = "avg"
    ls = float(flags["layer_scale_init_value"])
    return Beit(img_size=img_size, patch_size=int(arch["patch_size"]), in_chans=in_chans,
                embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]), num_heads=int(arch["num_heads"]),
                mlp_ratio=float(arch["mlp_ratio"]), qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=norm_eps), init_values=ls if ls > 0 else None,
                use_abs_pos_emb=bool(flags["use_abs_pos_emb"]), use_rel_pos_bias=bool(flags["use_rel_pos_bias"]),
                use_shared_rel_pos_bias=bool(flags["use_shared_rel_pos_bias"]), **kwargs)
