"""Checkpoint layouts of the Eva family (:mod:`mimbench.encoders.eva`): DINOv3 and EVA-02, official and timm names,
and transformers' ``DINOv3ViTModel``; used by :mod:`mimbench.encoders.convert`.

* ``dinov3`` - the official torch.hub state dict (facebookresearch/dinov3 ``vision_transformer.py``):
  ``storage_tokens`` -> ``reg_token``, ``blocks.i.ls1/ls2.gamma`` -> ``gamma_1/2``, ``attn.qkv.bias`` split
  into ``q_bias`` / ``v_bias`` (its key third is what ``attn.qkv.bias_mask`` zeroes; the mask, a buffer that
  is NaN until initialised, is dropped), SwiGLU ``mlp.w1/w2/w3`` -> ``fc1_g/fc1_x/fc2``; ``mask_token``,
  ``rope_embed.periods`` (recomputed), ``local_cls_norm`` (training only) dropped. timm's ``vit_*_dinov3``
  state dicts already use the encoder file's names. Rotary: base 100, half rotation, coordinates in [-1, 1];
  LayerNorm eps 1e-5; layer scale. Evaluated as the DINOv3 code does: k-NN on the normed class token,
  linear probe on the normed class token + the mean of the normed patch tokens.
* ``eva02`` - the official EVA-02 (baaivision/EVA ``EVA-02/asuka``) and timm ``eva02_*`` names:
  ``mlp.w12`` -> ``fc1`` (packed SwiGLU), ``mlp.w1/w2/w3`` -> ``fc1_g/fc1_x/fc2``, ``mlp.ffn_ln`` ->
  ``mlp.norm``, ``attn.inner_attn_ln`` -> ``attn.norm`` (sub-LN), ``attn.q_bias/v_bias`` -> ``q_proj/v_proj.bias``
  when q/k/v are separate; ``rope.*`` buffers (recomputed), ``mask_token``, ``lm_head`` dropped. Rotary: base
  10000, interleaved pairs, positions scaled to the 16 x 16 pre-training grid (224 / 14); eps 1e-6. Evaluated
  on the mean of the patch tokens.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from mimbench.encoders.arch import arch_name, default_num_heads, parse_arch
from mimbench.encoders.eva import eva_metadata, swiglu_split
from mimbench.encoders.file import check_tensors, encoder_metadata
from mimbench.errors import MimbenchError

#: Rotary and evaluation settings per layout (sources in the module docstring and docs/checkpoints.md).
DINOV3_FLAGS = dict(rope_type="dinov3", rope_temperature=100.0, rope_rotate_half=True, rope_grid_offset=0.0,
                    rope_ref_grid=0, linear_pool="cls+avg", knn_pool="cls", scale_attn_inner=False,
                    scale_mlp=False, use_abs_pos_emb=False, qkv_fused=True)
EVA02_FLAGS = dict(rope_type="cat", rope_temperature=10000.0, rope_rotate_half=False, rope_grid_offset=0.0,
                   rope_ref_grid=16, linear_pool="avg", knn_pool="avg", num_reg_tokens=0)
DINOV3_EPS, EVA02_EPS = "1e-05", "1e-06"
#: DINOv3's layer-scale init (the checkpoints store the trained gammas; this is what the metadata records).
DINOV3_LAYER_SCALE = 1e-5
#: DINOv3 pre-training resolution (timm ``_dinov3_cfg`` input_size 256), recorded when nothing says otherwise.
DINOV3_IMG_SIZE = 256

_DINOV3_DROP = re.compile(r"^(mask_token|rope_embed\.|local_cls_norm\.|head\.|blocks\.\d+\.attn\.qkv\.bias_mask$)")
_EVA02_DROP = re.compile(r"^(mask_token|rope\.|lm_head\.|head\.|blocks\.\d+\.attn\.rope\.)")
_EVA02_RENAMES = (("mlp.ffn_ln.", "mlp.norm."), ("attn.inner_attn_ln.", "attn.norm."), ("mlp.w12.", "mlp.fc1."),
                  ("mlp.w1.", "mlp.fc1_g."), ("mlp.w2.", "mlp.fc1_x."), ("mlp.w3.", "mlp.fc2."))
_DINOV3_RENAMES = (("ls1.gamma", "gamma_1"), ("ls2.gamma", "gamma_2"), ("mlp.w1.", "mlp.fc1_g."),
                   ("mlp.w2.", "mlp.fc1_x."), ("mlp.w3.", "mlp.fc2."))


def eva_layout_of(sd: Mapping[str, torch.Tensor]) -> str | None:
    """"dinov3" / "eva02" when a state dict's keys are those of one of the Eva layouts, else None."""
    keys = set(sd)
    if "storage_tokens" in keys or any(k.endswith(("attn.qkv.bias_mask", "rope_embed.periods")) for k in keys):
        return "dinov3"
    if "reg_token" in keys and "pos_embed" not in keys and "blocks.0.gamma_1" in keys:
        return "dinov3"  # timm vit_*_dinov3: registers, layer scale, rotary only
    if any(k.endswith("ls1.gamma") for k in keys):
        return None  # DINOv2 (official and timm names) has layer scale and SwiGLU too; EVA-02 has no layer scale
    eva02_marks = ("mlp.w12.weight", "mlp.ffn_ln.weight", "attn.inner_attn_ln.weight", "mlp.fc1_g.weight",
                   "mlp.w3.weight", "attn.q_proj.weight")
    if any(k.startswith("rope.") for k in keys) or any(f"blocks.0.{m}" in keys for m in eva02_marks):
        return "eva02"
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:
        return "eva02"  # timm eva02_tiny/small: packed SwiGLU (fc1 twice fc2's input width)
    return None


def _rename(k: str, renames) -> str:
    for old, new in renames:
        if old in k:
            return k.replace(old, new)
    return k


def _dinov3_tensors(sd: dict[str, torch.Tensor], dropped: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if _DINOV3_DROP.match(k):
            dropped.append(k)
        elif k.endswith("attn.qkv.bias"):  # the key third is masked to zero (bias_mask); timm's k_bias is zero
            q, _, val = v.chunk(3, dim=-1)
            out[k.replace("qkv.bias", "q_bias")], out[k.replace("qkv.bias", "v_bias")] = q, val
        else:
            out["reg_token" if k == "storage_tokens" else _rename(k, _DINOV3_RENAMES)] = v
    return out


def _eva02_tensors(sd: dict[str, torch.Tensor], dropped: list[str]) -> dict[str, torch.Tensor]:
    separate = "blocks.0.attn.q_proj.weight" in sd
    out = {}
    for k, v in sd.items():
        if _EVA02_DROP.match(k):
            dropped.append(k)
            continue
        k = _rename(k, _EVA02_RENAMES)
        if separate:
            k = k.replace("attn.q_bias", "attn.q_proj.bias").replace("attn.v_bias", "attn.v_proj.bias")
        out[k] = v
    return out


def _mlp_flags(sd: Mapping[str, torch.Tensor], embed_dim: int) -> tuple[dict, int]:
    """(SwiGLU flags, MLP hidden width) read off block 0."""
    if "blocks.0.mlp.fc1_g.weight" in sd:
        hidden = int(sd["blocks.0.mlp.fc1_g.weight"].shape[0])
        # align_to 1: gate and value kept apart at the stored width (timm's SwiGLU rounds up to a multiple of it)
        return dict(swiglu_mlp=True, swiglu_align_to=0 if "blocks.0.mlp.norm.weight" in sd else 1), hidden
    fc1, fc2 = sd["blocks.0.mlp.fc1.weight"], sd["blocks.0.mlp.fc2.weight"]
    packed = fc1.shape[0] == 2 * fc2.shape[1]
    return dict(swiglu_mlp=packed, swiglu_align_to=0), int(fc2.shape[1])


def eva_flags(sd: Mapping[str, torch.Tensor], layout: str, embed_dim: int) -> tuple[dict, int]:
    """(Eva metadata flags, MLP hidden width) of a state dict already in the encoder file's names."""
    flags = dict(DINOV3_FLAGS if layout == "dinov3" else EVA02_FLAGS)
    mlp, hidden = _mlp_flags(sd, embed_dim)
    flags |= mlp
    flags["scale_mlp"] = "blocks.0.mlp.norm.weight" in sd
    flags["qkv_fused"] = "blocks.0.attn.qkv.weight" in sd
    flags["qkv_bias"] = "blocks.0.attn.q_bias" in sd or "blocks.0.attn.q_proj.bias" in sd
    flags["scale_attn_inner"] = "blocks.0.attn.norm.weight" in sd
    flags["use_abs_pos_emb"] = "pos_embed" in sd
    flags["num_reg_tokens"] = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    flags["layer_scale_init_value"] = DINOV3_LAYER_SCALE if "blocks.0.gamma_1" in sd else 0.0
    flags["final_norm"] = "tokens" if "norm.weight" in sd else "pooled"
    if flags["final_norm"] == "pooled":
        flags["linear_pool"] = flags["knn_pool"] = "avg"
    return flags, hidden


def eva_layout_state(sd: dict[str, torch.Tensor], layout: str, src) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tensors in the encoder file's names, dropped names) of a ``dinov3`` / ``eva02`` state dict; a final norm
    of pooled features next to a per-token one (``fc_norm`` and ``norm``) keeps the per-token one."""
    dropped: list[str] = []
    out = _dinov3_tensors(sd, dropped) if layout == "dinov3" else _eva02_tensors(sd, dropped)
    if "norm.weight" in out and "fc_norm.weight" in out:
        dropped += [k for k in out if k.startswith("fc_norm.")]
        out = {k: v for k, v in out.items() if not k.startswith("fc_norm.")}
    if "cls_token" not in out:
        raise MimbenchError(f"{src}: a {layout} checkpoint without a class token (first keys: "
                            f"{', '.join(list(sd)[:6])}).", "Give the backbone's state dict (docs/checkpoints.md).")
    return out, dropped


_HF_BLOCK = (("norm1.", "norm1."), ("norm2.", "norm2."), ("attention.o_proj.", "attn.proj."),
             ("layer_scale1.lambda1", "gamma_1"), ("layer_scale2.lambda1", "gamma_2"),
             ("mlp.up_proj.", "mlp.fc1."), ("mlp.down_proj.", "mlp.fc2."))
_HF_SWIGLU = (("mlp.gate_proj.", "mlp.fc1_g."), ("mlp.up_proj.", "mlp.fc1_x."), ("mlp.down_proj.", "mlp.fc2."))


def _hf_block(i: int, sd: Mapping[str, torch.Tensor], gated: bool) -> dict[str, torch.Tensor]:
    pre, out = f"layer.{i}.", {}
    renames = _HF_SWIGLU + _HF_BLOCK if gated else _HF_BLOCK
    q, k, v = (sd[f"{pre}attention.{n}_proj.weight"] for n in "qkv")
    out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
    if f"{pre}attention.q_proj.bias" in sd:
        out[f"blocks.{i}.attn.q_bias"] = sd[f"{pre}attention.q_proj.bias"]
        out[f"blocks.{i}.attn.v_bias"] = sd[f"{pre}attention.v_proj.bias"]
    for key, value in sd.items():
        if key.startswith(pre) and ".attention." not in key.replace("attention.o_proj.", ""):
            out[f"blocks.{i}." + _rename(key[len(pre):], renames)] = value
    return out


def _hf_check_config(config: Mapping, state: Mapping[str, torch.Tensor]) -> None:
    """MimbenchError for a config timm's Eva cannot compute the same (before any tensor is mapped)."""
    problems = []
    if config.get("model_type") not in (None, "dinov3_vit"):
        problems.append(f"model_type is {config.get('model_type')!r}, not 'dinov3_vit'")
    if config.get("key_bias"):
        problems.append("key_bias is set (timm's Eva fixes the key bias at zero)")
    if bool(config.get("query_bias", True)) != bool(config.get("value_bias", True)):
        problems.append("query_bias and value_bias differ (timm's Eva has both or neither)")
    if not config.get("proj_bias", True) or not config.get("mlp_bias", True):
        problems.append("proj_bias or mlp_bias is off (timm's Eva always has them)")
    act = "silu" if config.get("use_gated_mlp") else "gelu"
    if config.get("hidden_act", "gelu") != act:
        problems.append(f"hidden_act is {config.get('hidden_act')!r} where timm's Eva computes {act!r}")
    if int(config.get("num_register_tokens", 0)) != (
            int(state["embeddings.register_tokens"].shape[1]) if "embeddings.register_tokens" in state else 0):
        problems.append("num_register_tokens disagrees with the weights")
    if problems:
        raise MimbenchError("This DINOv3ViTModel cannot be read as an Eva encoder: " + "; ".join(problems) + ".",
                            "Supported: DINOv3 models as facebook publishes them (save_pretrained of DINOv3ViTModel); "
                            "a config.json that disagrees with its weights must be fixed first.")


def mlp_ratio_of(hidden: int, embed_dim: int) -> float:
    """The ``mlp_ratio`` whose int(D * ratio) is ``hidden`` (guarding float rounding for odd widths)."""
    ratio = hidden / embed_dim
    return ratio if int(embed_dim * ratio) == hidden else (hidden + 0.5) / embed_dim


def hf_dinov3_state(state: Mapping[str, torch.Tensor], config: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of the encoder file of a transformers ``DINOv3ViTModel``: its state dict and its
    ``config.json`` as a dict, the config being the source of eps, image and patch size, heads, registers, rotary
    base and layer-scale value. ``mask_token`` is dropped (``source_dropped``); the caller may add provenance
    (``source``, ``source_sha256``) to the checked metadata returned.
    """
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
    _hf_check_config(config, state)
    depth, d = int(config["num_hidden_layers"]), int(config["hidden_size"])
    out = {"cls_token": state["embeddings.cls_token"], "norm.weight": state["norm.weight"],
           "norm.bias": state["norm.bias"], "patch_embed.proj.weight": state["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embeddings.bias"]}
    if "embeddings.register_tokens" in state:
        out["reg_token"] = state["embeddings.register_tokens"]
    for i in range(depth):
        out |= _hf_block(i, state, bool(config.get("use_gated_mlp", False)))
    flags, hidden = eva_flags(out, "dinov3", d)
    flags["rope_temperature"] = float(config.get("rope_theta", DINOV3_FLAGS["rope_temperature"]))
    flags["layer_scale_init_value"] = float(config.get("layerscale_value", DINOV3_LAYER_SCALE))
    size, patch = config.get("image_size", DINOV3_IMG_SIZE), config["patch_size"]
    size, patch = (int(x[0]) if isinstance(x, (list, tuple)) else int(x) for x in (size, patch))
    arch = dict(img_size=size, patch_size=patch, embed_dim=d, depth=depth,
                num_heads=int(config["num_attention_heads"]), mlp_ratio=mlp_ratio_of(hidden, d))
    extra = eva_metadata(flags) | {"norm_eps": repr(float(config.get("layer_norm_eps", 1e-5))),
                                   "source_layout": "hf-dinov3", "source_dropped": "embeddings(1)"}
    meta = encoder_metadata(arch=arch_name(d, depth, patch), technique="dinov3", source="DINOv3ViTModel",
                            family="eva", extra=extra, where="DINOv3ViTModel", **arch)
    tensors = {k: v.detach().contiguous() for k, v in out.items()}
    check_tensors({k: tuple(v.shape) for k, v in tensors.items()}, meta, parse_arch(meta, "DINOv3ViTModel"),
                  "DINOv3ViTModel (read as hf-dinov3)")
    return tensors, meta


def _blocks(sd: Mapping[str, torch.Tensor]) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})


def eva_arch(sd: Mapping[str, torch.Tensor], layout: str, src, num_heads: int | None) -> tuple[dict, dict]:
    """(architecture fields, Eva flags) of a state dict in the encoder file's names (:func:`eva_layout_state`).

    Heads: ``num_heads``, else the standard size's, else 64-dim heads. Image size: the grid of ``pos_embed``
    (EVA-02), else DINOv3's pre-training resolution (rotary embeddings hold no grid).
    """
    hint = "Give the backbone's state dict of a DINOv3 or EVA-02 model (docs/checkpoints.md), or force --from."
    w = sd.get("patch_embed.proj.weight")
    depth = _blocks(sd)
    if w is None or w.ndim != 4 or w.shape[2] != w.shape[3] or not depth:
        raise MimbenchError(f"{src}: no square patch embedding or no blocks.<i>.* in a {layout} checkpoint.", hint)
    d, patch = int(w.shape[0]), int(w.shape[2])
    flags, hidden = eva_flags(sd, layout, d)
    heads = num_heads or default_num_heads(d, depth)
    if not heads or d % heads:
        raise MimbenchError(f"{src}: the number of attention heads cannot be inferred for embed_dim {d}.",
                            "Pass num_heads explicitly (convert_checkpoint(..., num_heads=H)).")
    size = DINOV3_IMG_SIZE
    if "pos_embed" in sd:
        n = int(sd["pos_embed"].shape[1]) - 1 - int(flags["num_reg_tokens"])
        if math.isqrt(n) ** 2 != n:
            raise MimbenchError(f"{src}: pos_embed has {n} patch positions, not a square grid.", hint)
        size = math.isqrt(n) * patch
    arch = dict(img_size=size, patch_size=patch, embed_dim=d, depth=depth, num_heads=heads,
                mlp_ratio=mlp_ratio_of(hidden, d))
    return arch, flags


def _dinov3_misfits(flags: Mapping) -> list[str]:
    """What keeps an Eva encoder from being a ``DINOv3ViTModel`` (which computes DINOv3's rotary embedding only,
    without absolute positions, sub-LN or a pooled final norm); [] when it is one."""
    misfits = []
    if flags["rope_type"] != "dinov3" or not flags["rope_rotate_half"] or float(flags["rope_grid_offset"]):
        misfits.append(f"rotary embedding of type {flags['rope_type']!r} (DINOv3ViTModel computes DINOv3's: half "
                       "rotation, patch centres in [-1, 1])")
    if flags["use_abs_pos_emb"]:
        misfits.append("an absolute pos_embed next to the rotary embedding")
    if flags["scale_attn_inner"] or flags["scale_mlp"]:
        misfits.append("sub-LN (attn.norm / mlp.norm)")
    if flags["final_norm"] != "tokens":
        misfits.append("a final norm of the pooled patch tokens (fc_norm) instead of a per-token norm")
    return misfits


def _dinov3_mlp(b: str, i: int, tensors: Mapping[str, torch.Tensor], flags: Mapping) -> dict[str, torch.Tensor]:
    """Block ``i``'s MLP in DINOv3ViTModel names: GELU ``up/down_proj``; SwiGLU ``gate/up/down_proj`` (timm's packed
    ``fc1`` holds the gate in its first half: GluMlp with ``gate_last=False``)."""
    L, out = f"layer.{i}.mlp.", {}
    if swiglu_split(flags):
        pairs = (("gate_proj", "fc1_g"), ("up_proj", "fc1_x"))
        out |= {L + f"{hf}.{p}": tensors[b + f"mlp.{timm}.{p}"] for hf, timm in pairs for p in ("weight", "bias")}
    elif flags["swiglu_mlp"]:
        for p in ("weight", "bias"):
            out[L + f"gate_proj.{p}"], out[L + f"up_proj.{p}"] = tensors[b + f"mlp.fc1.{p}"].chunk(2)
    else:
        out |= {L + f"up_proj.{p}": tensors[b + f"mlp.fc1.{p}"] for p in ("weight", "bias")}
    return out | {L + f"down_proj.{p}": tensors[b + f"mlp.fc2.{p}"] for p in ("weight", "bias")}


def _dinov3_block(i: int, tensors: Mapping[str, torch.Tensor], flags: Mapping, d: int) -> dict[str, torch.Tensor]:
    b, L = f"blocks.{i}.", f"layer.{i}."
    if flags["qkv_fused"]:
        q, k, v = tensors[b + "attn.qkv.weight"].chunk(3)
        biases = (tensors[b + "attn.q_bias"], tensors[b + "attn.v_bias"]) if flags["qkv_bias"] else None
    else:
        q, k, v = (tensors[b + f"attn.{n}_proj.weight"] for n in "qkv")
        biases = (tensors[b + "attn.q_proj.bias"], tensors[b + "attn.v_proj.bias"]) if flags["qkv_bias"] else None
    out = {L + "attention.q_proj.weight": q, L + "attention.k_proj.weight": k, L + "attention.v_proj.weight": v}
    if biases is not None:
        out[L + "attention.q_proj.bias"], out[L + "attention.v_proj.bias"] = biases
    for p in ("weight", "bias"):
        out[L + f"attention.o_proj.{p}"] = tensors[b + f"attn.proj.{p}"]
        out[L + f"norm1.{p}"], out[L + f"norm2.{p}"] = tensors[b + f"norm1.{p}"], tensors[b + f"norm2.{p}"]
    for n in ("1", "2"):  # DINOv3ViTModel always scales; ones compute what a block without layer scale does
        gamma = tensors.get(b + f"gamma_{n}")
        out[L + f"layer_scale{n}.lambda1"] = gamma if gamma is not None else torch.ones(d, dtype=q.dtype)
    return out | _dinov3_mlp(b, i, tensors, flags)


def hf_dinov3_files(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], arch: Mapping, flags: Mapping,
                    eps: float) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json dict, state in save_pretrained names)`` of a DINOv3-style Eva encoder as a ``DINOv3ViTModel``
    (the inverse of :func:`hf_dinov3_state`); any other Eva encoder (EVA-02: "cat" rotary embedding scaled to its
    pre-training grid, absolute ``pos_embed``, sub-LN) has no transformers class and is refused."""
    misfits = _dinov3_misfits(flags)
    if misfits:
        raise MimbenchError("No transformers class holds this Eva-family encoder: DINOv3ViTModel, the only one with "
                            "rotary embeddings, lacks " + "; ".join(misfits) + ".",
                            "Export it with --to timm (timm's Eva loads the encoder file as it is).")
    d, depth = int(arch["embed_dim"]), int(arch["depth"])
    w = tensors["patch_embed.proj.weight"]
    regs = int(flags["num_reg_tokens"])
    state = {"embeddings.cls_token": tensors["cls_token"], "embeddings.mask_token": torch.zeros(1, 1, d, dtype=w.dtype),
             "embeddings.register_tokens": tensors["reg_token"] if regs else torch.zeros(1, 0, d, dtype=w.dtype),
             "embeddings.patch_embeddings.weight": w,
             "embeddings.patch_embeddings.bias": tensors["patch_embed.proj.bias"],
             "norm.weight": tensors["norm.weight"], "norm.bias": tensors["norm.bias"]}
    for i in range(depth):
        state |= _dinov3_block(i, tensors, flags, d)
    gated = bool(flags["swiglu_mlp"])
    ls = float(flags["layer_scale_init_value"])
    config = {"architectures": ["DINOv3ViTModel"], "model_type": "dinov3_vit", "hidden_size": d,
              "num_hidden_layers": depth, "num_attention_heads": int(arch["num_heads"]),
              "intermediate_size": int(state["layer.0.mlp.down_proj.weight"].shape[1]),
              "hidden_act": "silu" if gated else "gelu", "use_gated_mlp": gated, "layer_norm_eps": eps,
              "rope_theta": float(flags["rope_temperature"]), "image_size": int(arch["img_size"]),
              "patch_size": int(arch["patch_size"]), "num_channels": int(w.shape[1]),
              "query_bias": bool(flags["qkv_bias"]), "key_bias": False, "value_bias": bool(flags["qkv_bias"]),
              "proj_bias": True, "mlp_bias": True, "layerscale_value": ls if ls > 0 else 1.0,
              "num_register_tokens": regs, "attention_dropout": 0.0, "drop_path_rate": 0.0,
              "initializer_range": 0.02}
    return config, {k: v.detach().contiguous().clone() for k, v in state.items()}
