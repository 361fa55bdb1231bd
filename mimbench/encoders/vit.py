"""The ViT encoder family: timm's ``VisionTransformer`` as the MAE/DeiT, DINOv2 and I-JEPA ViTs are built.

An encoder file of this family (``family`` field absent or ``vit``) holds the state dict of a timm
``VisionTransformer`` without classifier head, in timm's key layout::

    cls_token                      (1, 1, D)                only with a class token
    reg_token                      (1, R, D)                only with R register tokens
    pos_embed                      (1, P + (S/p)**2, D)     P prefix positions (class, registers) then the patch
                                                            grid row-major; P = 0 with no_embed_class
    patch_embed.proj.weight/bias   (D, C, p, p) / (D,)
    blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2 .weight/.bias
    blocks.{i}.ls1.gamma/ls2.gamma (D,)                     only with layer scale
    norm.weight/bias               (D,)                     final per-token LayerNorm

Pre-norm blocks, LayerNorm eps 1e-6 (``norm_eps`` in the metadata when it differs), qkv bias, GELU
MLP, learned (or stored fixed) absolute position embeddings. The family's own metadata fields
(:data:`VIT_FIELDS`, all optional; a file without them is the MAE/DeiT ViT it always was):

* ``class_token`` -- "true" (default) / "false" (I-JEPA: no class token);
* ``reg_tokens`` -- number of register tokens (DINOv2 with registers: 4; default 0). Registers sit
  after the class token and before the patches; they are never pooled and never part of a patch map;
* ``no_embed_class`` -- "true" when the position embedding has no prefix slots (timm's
  ``no_embed_class``: DINOv2 with registers as timm stores it, the class position folded into
  ``cls_token``); default "false";
* ``init_values`` -- layer-scale initial value (a float; the ``ls1/ls2.gamma`` tensors are what
  count); absent = no layer scale;
* ``pos_resample`` -- how ``pos_embed`` moves to another grid (:data:`POS_RESAMPLE`): "bicubic"
  (default: MAE / mmseg, :func:`~mimbench.encoders.resample.resample_pos_embed`), "dinov2"
  (bicubic with scale factor (g+0.1)/M, no antialias: DINOv2's ``interpolate_offset=0.1``) or
  "dinov2-reg" (bicubic to the size, antialias: DINOv2 with registers' ``interpolate_offset=0``,
  ``interpolate_antialias=True``); facebookresearch/dinov2 ``models/vision_transformer.py``;
* ``global_pool`` -- the pooling its authors evaluate, "token" (class token) or "avg" (mean of the
  patch tokens after the final norm: I-JEPA); absent = the family's default ("token");
* ``swiglu_mlp`` -- "true" for DINOv2 giant's SwiGLU MLP instead of the GELU one: timm's ``SwiGLUPacked``
  (``GluMlp`` with the gate in the first half of ``fc1``) with SiLU, as timm's ``vit_giant_patch14_dinov2``.
  ``mlp.fc1`` is (2h, D), ``mlp.fc2`` (D, h); ``mlp_ratio`` is timm's, 2h / D (DINOv2's rule
  h = ceil8(int(4D * 2/3)): 4096 at D = 1536). Default "false".
"""
from __future__ import annotations

from functools import partial
from typing import Mapping

import torch
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer

from mimbench.encoders.arch import mlp_hidden
from mimbench.encoders.resample import resample_pos_embed, resample_pos_embed_offset
from mimbench.errors import MimbenchError

#: Metadata fields of the ViT family besides the common ones (all optional, see the module docstring).
VIT_FIELDS = ("class_token", "reg_tokens", "no_embed_class", "init_values", "pos_resample", "global_pool",
              "swiglu_mlp")
#: Position-embedding resampling variants -> (offset, antialias); "bicubic" is resample_pos_embed's rule.
POS_RESAMPLE = {"bicubic": None, "dinov2": (0.1, False), "dinov2-reg": (0.0, True)}
POOLS = ("token", "avg")
_BOOL = {"true": True, "false": False}


def _bool_field(meta: Mapping[str, str], key: str, default: bool, where: str) -> bool:
    value = str(meta.get(key, "true" if default else "false")).lower()
    if value not in _BOOL:
        raise MimbenchError(f"{where}: ViT metadata field {key!r} is {meta.get(key)!r}, not 'true' or 'false'.",
                            "Re-export or re-convert the encoder.")
    return _BOOL[value]


def _choice_field(meta: Mapping[str, str], key: str, choices, default, where: str):
    value = meta.get(key, default)
    if value is not None and value not in choices:
        raise MimbenchError(f"{where}: ViT metadata field {key!r} is {value!r}.",
                            f"Use one of {', '.join(choices)} (or re-convert the encoder).")
    return value


def _number_field(meta: Mapping[str, str], key: str, kind: type, where: str):
    if meta.get(key, "") == "":
        return None
    try:
        value = kind(meta[key])
    except ValueError:
        value = None
    if value is None or value < 0:
        raise MimbenchError(f"{where}: ViT metadata field {key!r} is {meta[key]!r}, not a non-negative number.",
                            "Re-export or re-convert the encoder.")
    return value


def parse_vit_fields(meta: Mapping[str, str], where: str) -> dict:
    """The ViT family's own metadata fields (:data:`VIT_FIELDS`) as Python values, defaults for absent ones."""
    flags = {
        "class_token": _bool_field(meta, "class_token", True, where),
        "reg_tokens": _number_field(meta, "reg_tokens", int, where) or 0,
        "no_embed_class": _bool_field(meta, "no_embed_class", False, where),
        "init_values": _number_field(meta, "init_values", float, where) or None,
        "pos_resample": _choice_field(meta, "pos_resample", tuple(POS_RESAMPLE), "bicubic", where),
        "global_pool": _choice_field(meta, "global_pool", POOLS, None, where),
        "swiglu_mlp": _bool_field(meta, "swiglu_mlp", False, where),
    }
    if not flags["class_token"] and flags["global_pool"] != "avg":
        raise MimbenchError(f"{where}: an encoder without a class token must say global_pool='avg'.",
                            "Re-convert the encoder (its pooling is the mean of the patch tokens).")
    return flags


def vit_metadata(flags: Mapping) -> dict[str, str]:
    """The fields of ``flags`` that differ from the defaults, as metadata strings (inverse of
    :func:`parse_vit_fields`; a plain MAE/DeiT ViT gets none, as before the fields existed)."""
    out: dict[str, str] = {}
    if not flags.get("class_token", True):
        out["class_token"] = "false"
    if int(flags.get("reg_tokens") or 0):
        out["reg_tokens"] = str(int(flags["reg_tokens"]))
    if flags.get("no_embed_class"):
        out["no_embed_class"] = "true"
    if flags.get("init_values"):
        out["init_values"] = repr(float(flags["init_values"]))
    if flags.get("pos_resample", "bicubic") != "bicubic":
        out["pos_resample"] = str(flags["pos_resample"])
    if flags.get("global_pool"):
        out["global_pool"] = str(flags["global_pool"])
    if flags.get("swiglu_mlp"):
        out["swiglu_mlp"] = "true"
    return out


def non_plain_fields(flags: Mapping) -> list[str]:
    """The metadata fields of ``flags`` that a plain ViT (HF ``ViTModel``, MAE's ``models_vit``) has no place for:
    no class token, register tokens, layer scale (``no_embed_class`` comes with the registers), a SwiGLU MLP."""
    return sorted(k for k in ("class_token", "reg_tokens", "no_embed_class", "init_values", "swiglu_mlp")
                  if k in vit_metadata(flags))


def num_prefix_tokens(flags: Mapping) -> int:
    """Tokens before the patch tokens in the encoder's output: the class token (if any) and the registers."""
    return int(flags.get("class_token", True)) + int(flags.get("reg_tokens") or 0)


def expected_shapes(*, img_size: int, patch_size: int, embed_dim: int, depth: int, mlp_ratio: float,
                    in_chans: int = 3, flags: Mapping | None = None) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a ViT encoder file with this architecture (timm VisionTransformer keys)."""
    flags = flags or {}
    d, h = embed_dim, mlp_hidden(embed_dim, mlp_ratio)
    grid = img_size // patch_size
    prefix = 0 if flags.get("no_embed_class") else num_prefix_tokens(flags)
    shapes: dict[str, tuple[int, ...]] = {}
    if flags.get("class_token", True):
        shapes["cls_token"] = (1, 1, d)
    if int(flags.get("reg_tokens") or 0):
        shapes["reg_token"] = (1, int(flags["reg_tokens"]), d)
    shapes.update({
        "pos_embed": (1, prefix + grid * grid, d),
        "patch_embed.proj.weight": (d, in_chans, patch_size, patch_size),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    })
    per_block = {
        "norm1.weight": (d,), "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,),
        "mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,),
        "mlp.fc2.weight": (d, h // 2 if flags.get("swiglu_mlp") else h), "mlp.fc2.bias": (d,),
    }
    if flags.get("init_values"):
        per_block.update({"ls1.gamma": (d,), "ls2.gamma": (d,)})
    for i in range(depth):
        for name, shape in per_block.items():
            shapes[f"blocks.{i}.{name}"] = shape
    return shapes


def vit_shapes(arch: Mapping[str, float], flags: Mapping, in_chans: int = 3) -> dict[str, tuple[int, ...]]:
    """:func:`expected_shapes` from parsed metadata (:func:`mimbench.encoders.arch.parse_arch`, flags)."""
    return expected_shapes(img_size=int(arch["img_size"]), patch_size=int(arch["patch_size"]),
                           embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]),
                           mlp_ratio=float(arch["mlp_ratio"]), in_chans=in_chans, flags=flags)


def build_vit(arch: Mapping[str, float], flags: Mapping, *, img_size, in_chans: int, norm_eps: float,
              **kwargs) -> VisionTransformer:
    """timm ``VisionTransformer`` with this architecture at ``img_size``; ``kwargs`` as load_encoder documents."""
    return VisionTransformer(img_size=img_size, patch_size=int(arch["patch_size"]), in_chans=in_chans,
                             embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]),
                             num_heads=int(arch["num_heads"]), mlp_ratio=float(arch["mlp_ratio"]), qkv_bias=True,
                             class_token=bool(flags.get("class_token", True)),
                             reg_tokens=int(flags.get("reg_tokens") or 0),
                             no_embed_class=bool(flags.get("no_embed_class", False)),
                             init_values=flags.get("init_values") or None,
                             norm_layer=partial(torch.nn.LayerNorm, eps=norm_eps), **_mlp_kwargs(flags), **kwargs)


def _mlp_kwargs(flags: Mapping) -> dict:
    """timm arguments of the MLP: DINOv2 giant's packed SwiGLU with SiLU (timm ``vit_giant_patch14_dinov2``)."""
    return dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU) if flags.get("swiglu_mlp") else {}


def resample_vit_state(state: dict[str, torch.Tensor], old_grid: int, new_grid,
                       flags: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Move the absolute position embedding from an ``old_grid`` square to ``new_grid``: prefix positions kept,
    the patch grid resampled by the file's ``pos_resample`` variant (default: bicubic as MAE / mmseg)."""
    flags = flags or {}
    prefix = 0 if flags.get("no_embed_class") else num_prefix_tokens(flags)
    variant = POS_RESAMPLE[flags.get("pos_resample") or "bicubic"]
    out = dict(state)
    if variant is None:
        out["pos_embed"] = resample_pos_embed(state["pos_embed"], new_grid, (old_grid, old_grid), prefix)
    else:
        out["pos_embed"] = resample_pos_embed_offset(state["pos_embed"], new_grid, (old_grid, old_grid), prefix,
                                                     offset=variant[0], antialias=variant[1])
    return out
