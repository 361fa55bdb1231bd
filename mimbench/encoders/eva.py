"""The Eva encoder family: timm's ``Eva`` (rotary position embeddings, SwiGLU, layer scale, registers, sub-LN),
the model timm builds DINOv3 (``vit_*_dinov3``) and EVA-02 (``eva02_*``) with.

An encoder file with ``family=eva`` holds a timm ``timm.models.eva.Eva`` state dict without the classifier
head (D = embed_dim, R = registers, g = stored grid, h = MLP hidden width)::

    cls_token                                 (1, 1, D)
    reg_token                                 (1, R, D)          only with registers (DINOv3: R = 4)
    pos_embed                                 (1, 1 + R + g*g, D) only with use_abs_pos_emb (EVA-02)
    patch_embed.proj.weight/bias              (D, C, p, p) / (D,)
    blocks.{i}.norm1/norm2.weight/bias        (D,)
    blocks.{i}.attn.qkv.weight                (3D, D)            qkv_fused; with qkv_bias also
    blocks.{i}.attn.q_bias / v_bias           (D,)               (the key bias is zero)
    blocks.{i}.attn.{q,k,v}_proj.weight       (D, D)             not qkv_fused; q_proj/v_proj.bias with qkv_bias
    blocks.{i}.attn.norm.weight/bias          (D,)               only with scale_attn_inner (sub-LN)
    blocks.{i}.attn.proj.weight/bias          (D, D) / (D,)
    blocks.{i}.gamma_1 / gamma_2              (D,)               only with layer scale
    blocks.{i}.mlp.fc1 / fc2                  GELU MLP, or packed SwiGLU (fc1 2h x D)
    blocks.{i}.mlp.fc1_g / fc1_x / fc2        SwiGLU with sub-LN (mlp.norm, h) or aligned width
    norm.weight/bias                          (D,)               final_norm=tokens: per-token final norm
    fc_norm.weight/bias                       (D,)               final_norm=pooled: norm of the mean patch token

Rotary embeddings have no parameters: timm recomputes them for the grid of any input size, so only an
absolute ``pos_embed`` is resampled. The metadata adds, as strings, ``family=eva`` and :data:`EVA_FIELDS`:
booleans ("true"/"false") ``qkv_bias``, ``qkv_fused``, ``scale_attn_inner``, ``swiglu_mlp``, ``scale_mlp``,
``use_abs_pos_emb``, ``rope_rotate_half``; integers ``swiglu_align_to``, ``num_reg_tokens``,
``rope_ref_grid`` (EVA-02's pre-training grid the rotary positions are scaled to, 0 = none); floats
``layer_scale_init_value`` (0 = no layer scale), ``rope_temperature``, ``rope_grid_offset``; ``rope_type``
(timm's "dinov3" or "cat"), ``final_norm`` ("tokens" or "pooled") and the pooling its authors evaluate:
``linear_pool`` / ``knn_pool`` (:data:`mimbench.schema.POOLS` names: "cls", "avg" or "cls+avg"). ``norm_eps`` (common field) holds the
LayerNorm eps (DINOv3 1e-5, EVA-02 1e-6).
"""
from __future__ import annotations

from functools import partial
from typing import Mapping

import torch
from timm.layers import LayerNorm
from timm.models.eva import Eva

from mimbench.encoders.arch import mlp_hidden
from mimbench.encoders.resample import resample_pos_embed
from mimbench.errors import MimbenchError

_BOOL_FIELDS = ("qkv_bias", "qkv_fused", "scale_attn_inner", "swiglu_mlp", "scale_mlp", "use_abs_pos_emb",
                "rope_rotate_half")
_INT_FIELDS = ("swiglu_align_to", "num_reg_tokens", "rope_ref_grid")
_FLOAT_FIELDS = ("layer_scale_init_value", "rope_temperature", "rope_grid_offset")
_CHOICES = {"rope_type": ("dinov3", "cat"), "final_norm": ("tokens", "pooled"),
            "linear_pool": ("cls", "avg", "cls+avg"), "knn_pool": ("cls", "avg", "cls+avg")}
#: Metadata fields of the Eva family besides the common ones.
EVA_FIELDS = _BOOL_FIELDS + _INT_FIELDS + _FLOAT_FIELDS + tuple(_CHOICES)
_BOOL = {"true": True, "false": False}
_FIX = "Re-export or re-convert the encoder."


def _parse_one(meta: Mapping[str, str], k: str, where: str):
    raw = meta.get(k)
    try:
        if k in _BOOL_FIELDS:
            return _BOOL[str(raw).lower()]
        if k in _INT_FIELDS:
            value = int(raw)
            if value < 0:
                raise ValueError
            return value
        if k in _FLOAT_FIELDS:
            return float(raw)
    except (KeyError, TypeError, ValueError):
        raise MimbenchError(f"{where}: Eva metadata field {k!r} is {raw!r}, not a valid "
                            f"{'true/false' if k in _BOOL_FIELDS else 'number'}.", _FIX) from None
    if raw not in _CHOICES[k]:
        raise MimbenchError(f"{where}: Eva metadata field {k!r} is {raw!r}, not one of {', '.join(_CHOICES[k])}.",
                            _FIX)
    return raw


def parse_eva_flags(meta: Mapping[str, str], where: str) -> dict:
    """The Eva fields of an encoder's metadata as Python values (bools, ints, floats, choices)."""
    flags = {k: _parse_one(meta, k, where) for k in EVA_FIELDS}
    if flags["final_norm"] == "pooled" and "cls" in flags["linear_pool"] + flags["knn_pool"]:
        raise MimbenchError(f"{where}: a final norm of the pooled patch tokens (final_norm=pooled) leaves no normed "
                            "class token to evaluate (linear_pool/knn_pool say 'cls').", _FIX)
    return flags


def eva_metadata(flags: Mapping) -> dict[str, str]:
    """The Eva fields as metadata strings (inverse of :func:`parse_eva_flags`)."""
    out = {k: "true" if bool(flags[k]) else "false" for k in _BOOL_FIELDS}
    out |= {k: str(int(flags[k])) for k in _INT_FIELDS}
    out |= {k: repr(float(flags[k])) for k in _FLOAT_FIELDS}
    out |= {k: str(flags[k]) for k in _CHOICES}
    return out


def swiglu_split(flags: Mapping) -> bool:
    """Whether a SwiGLU MLP keeps gate and value apart (``fc1_g`` / ``fc1_x``), as timm does with sub-LN or
    alignment; otherwise they are packed in one ``fc1``."""
    return bool(flags["swiglu_mlp"]) and bool(flags["scale_mlp"] or flags["swiglu_align_to"])


def _mlp_shapes(d: int, h: int, flags: Mapping) -> dict[str, tuple[int, ...]]:
    if swiglu_split(flags):
        align = int(flags["swiglu_align_to"])
        h = h + (-h % align) if align else h
        out = {"mlp.fc1_g.weight": (h, d), "mlp.fc1_g.bias": (h,), "mlp.fc1_x.weight": (h, d), "mlp.fc1_x.bias": (h,)}
    elif flags["swiglu_mlp"]:
        out = {"mlp.fc1.weight": (2 * h, d), "mlp.fc1.bias": (2 * h,)}
    else:
        out = {"mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,)}
    if flags["scale_mlp"]:
        out |= {"mlp.norm.weight": (h,), "mlp.norm.bias": (h,)}
    return out | {"mlp.fc2.weight": (d, h), "mlp.fc2.bias": (d,)}


def _attn_shapes(d: int, flags: Mapping) -> dict[str, tuple[int, ...]]:
    if flags["qkv_fused"]:
        out = {"attn.qkv.weight": (3 * d, d)}
        out |= {"attn.q_bias": (d,), "attn.v_bias": (d,)} if flags["qkv_bias"] else {}
    else:
        out = {f"attn.{n}_proj.weight": (d, d) for n in "qkv"}
        out |= {"attn.q_proj.bias": (d,), "attn.v_proj.bias": (d,)} if flags["qkv_bias"] else {}
    if flags["scale_attn_inner"]:
        out |= {"attn.norm.weight": (d,), "attn.norm.bias": (d,)}
    return out | {"attn.proj.weight": (d, d), "attn.proj.bias": (d,)}


def eva_shapes(arch: Mapping[str, float], flags: Mapping, in_chans: int = 3) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of an Eva-family encoder file (``arch``: :func:`mimbench.encoders.arch.parse_arch`)."""
    d, p = int(arch["embed_dim"]), int(arch["patch_size"])
    g, regs = int(arch["img_size"]) // p, int(flags["num_reg_tokens"])
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d), "patch_embed.proj.weight": (d, in_chans, p, p),
                                          "patch_embed.proj.bias": (d,)}
    if regs:
        shapes["reg_token"] = (1, regs, d)
    if flags["use_abs_pos_emb"]:
        shapes["pos_embed"] = (1, 1 + regs + g * g, d)
    norm = "norm" if flags["final_norm"] == "tokens" else "fc_norm"
    shapes |= {f"{norm}.weight": (d,), f"{norm}.bias": (d,)}
    per_block = {"norm1.weight": (d,), "norm1.bias": (d,), "norm2.weight": (d,), "norm2.bias": (d,)}
    per_block |= _attn_shapes(d, flags) | _mlp_shapes(d, mlp_hidden(d, float(arch["mlp_ratio"])), flags)
    if flags["layer_scale_init_value"] > 0:
        per_block |= {"gamma_1": (d,), "gamma_2": (d,)}
    for i in range(int(arch["depth"])):
        shapes |= {f"blocks.{i}.{name}": shape for name, shape in per_block.items()}
    return shapes


def resample_eva_state(state: dict[str, torch.Tensor], old_grid: int, new_grid,
                       flags: Mapping | None = None) -> dict[str, torch.Tensor]:
    """Move an absolute ``pos_embed`` (class and register positions kept) to ``new_grid``; rotary embeddings are
    recomputed by timm for any grid, so without ``pos_embed`` nothing changes. ``flags`` (the parsed Eva fields)
    choose nothing here: the family has one resampling."""
    if "pos_embed" not in state:
        return dict(state)
    prefix = 1 + (int(state["reg_token"].shape[1]) if "reg_token" in state else 0)
    out = dict(state)
    out["pos_embed"] = resample_pos_embed(state["pos_embed"], new_grid, (old_grid, old_grid), num_prefix_tokens=prefix)
    return out


def eva_global_pool(flags: Mapping) -> str:
    """timm ``global_pool`` of a loaded Eva encoder unless told otherwise: the class token when the file has a
    per-token final norm, the mean of the patch tokens (then ``fc_norm``) when its final norm is a pooled one."""
    return "token" if flags["final_norm"] == "tokens" else "avg"


def eva_task_pool(flags: Mapping, task: str) -> str | None:
    """The pooling the file's authors evaluate ``task`` with: ``knn_pool`` / ``linear_pool`` (DINOv3: k-NN "cls",
    linear "cls+avg"; EVA-02: "avg"), None for other tasks (the family default then holds)."""
    return flags.get(f"{task}_pool")


def build_eva(arch: Mapping[str, float], flags: Mapping, *, img_size, in_chans: int, norm_eps: float = 1e-6,
              **kwargs) -> Eva:
    """timm ``Eva`` with this architecture at ``img_size``; ``kwargs`` as load_encoder documents (``fc_norm``
    means Eva's ``use_fc_norm``).

    A file whose final norm is a pooled one (``final_norm=pooled``, EVA-02 as timm ships it) keeps its
    ``fc_norm`` whatever the pooling; otherwise ``fc_norm`` follows the option (fresh when on).
    """
    use_fc_norm = kwargs.pop("fc_norm", None)
    if flags["final_norm"] == "pooled":
        use_fc_norm = True
    ls = float(flags["layer_scale_init_value"])
    ref = int(flags["rope_ref_grid"])
    rope = dict(rope_type=flags["rope_type"], rope_temperature=float(flags["rope_temperature"]),
                rope_rotate_half=bool(flags["rope_rotate_half"]), rope_grid_offset=float(flags["rope_grid_offset"]))
    if flags["rope_type"] == "cat":
        rope["ref_feat_shape"] = (ref, ref) if ref else None
    return Eva(img_size=img_size, patch_size=int(arch["patch_size"]), in_chans=in_chans,
               embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]), num_heads=int(arch["num_heads"]),
               mlp_ratio=float(arch["mlp_ratio"]), qkv_bias=bool(flags["qkv_bias"]),
               qkv_fused=bool(flags["qkv_fused"]), swiglu_mlp=bool(flags["swiglu_mlp"]),
               swiglu_align_to=int(flags["swiglu_align_to"]), scale_mlp=bool(flags["scale_mlp"]),
               scale_attn_inner=bool(flags["scale_attn_inner"]), init_values=ls if ls > 0 else None,
               num_reg_tokens=int(flags["num_reg_tokens"]), use_abs_pos_emb=bool(flags["use_abs_pos_emb"]),
               use_rot_pos_emb=True, norm_layer=partial(LayerNorm, eps=norm_eps), use_fc_norm=use_fc_norm,
               **rope, **kwargs)

