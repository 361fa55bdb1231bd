"""Foreign checkpoints -> encoder tensors + metadata, in memory or as an encoder file.

The layouts (key facts and sources in ``docs/checkpoints.md``):

ViT family (timm ``VisionTransformer``):

* ``mae`` - official MAE (``{"model": sd}``); decoder (``decoder_*``) and ``mask_token`` dropped.
* ``timm`` - a plain timm ViT state dict (.pth/.bin/.safetensors), e.g. DINO's or iBOT's
  backbone-only releases; ``head`` dropped.
* ``deit`` - DeiT (``{"model": sd}``); distilled models (``dist_token``) refused.
* ``mmpretrain`` - ``{"state_dict": sd}``, encoder under ``backbone.`` with mmpretrain module names.
* ``dino`` / ``ibot`` - full training checkpoints ``{"student": sd, "teacher": sd, ...}``: the
  teacher is taken (what both papers evaluate), ``backbone.`` / ``module.backbone.`` stripped,
  projection heads dropped; iBOT's ``masked_embed`` (the mask token) dropped. A single network
  saved with its ``backbone.`` prefix (e.g. ``{"state_dict": teacher}``) is read the same way.
* ``mocov3`` - ``{"state_dict": sd}`` with ``module.base_encoder.`` (kept, its ``head`` -- the
  projection MLP -- dropped), ``module.momentum_encoder.`` and ``module.predictor.`` (dropped).
* ``vissl`` - ``{"classy_state_dict": {"base_model": {"model": {"trunk": sd, "heads": sd}}}}``;
  the ViT trunk names ``class_token`` / ``pos_embedding`` become ``cls_token`` / ``pos_embed``,
  heads dropped; LayerNorm eps 1e-5 (``nn.LayerNorm``'s default, which VISSL's trunk uses) is
  kept in the ``norm_eps`` metadata; a trunk trained without qkv bias gets zero biases
  (``source_filled``), which computes the same.

* ``dinov2`` - DINOv2 with or without registers (:mod:`mimbench.encoders.dinov2`): the official
  torch.hub state dicts (``cls_token``, ``register_tokens``, ``pos_embed`` with a class slot,
  ``mask_token`` -- dropped --, ``blocks.i.ls1.gamma``, ...) and timm's ``vit_*_dinov2`` /
  ``vit_*_reg4_dinov2`` state dicts; layer scale, registers (``no_embed_class``, class position folded
  into ``cls_token`` as timm does) and DINOv2's position resampling recorded in the metadata.
  Auto-detected by ``register_tokens`` or ``mask_token`` + ``ls1.gamma`` (official), or layer scale
  + patch 14 + registers or a class slot (timm).
* ``ijepa`` - the official I-JEPA training checkpoint (:mod:`mimbench.encoders.ijepa`):
  ``{"encoder", "predictor", "target_encoder", ...}`` with ``module.`` keys; the target encoder is
  read (``source_part``), the encoder has no class token and is pooled by the mean of its patch tokens.
  ``ijepa-context`` (never detected, ``--from`` only) reads the context encoder ``encoder`` instead (what
  the HF and timm conversions ship).

A timm state dict of a ViT with register tokens (``reg_token``), layer scale (``ls1/ls2.gamma``) or
without a class token (then pooled by the mean of the patch tokens) is read by ``timm`` with those
fields recorded.

BEiT family (timm ``Beit``, see :mod:`mimbench.encoders.beit`):

* ``beit`` / ``beitv2`` / ``data2vec-vision`` - the unilm BEiT code's checkpoints
  (``{"model": sd}``, or ``{"module": sd}``): ``blocks.i.attn.q_bias/v_bias``,
  ``blocks.i.gamma_1/gamma_2``, a shared ``rel_pos_bias.relative_position_bias_table`` or per-block
  ``blocks.i.attn.relative_position_bias_table``; ``relative_position_index`` buffers,
  ``mask_token``, ``lm_head`` and BEiT v2's patch-aggregation head (``cls_pt_layers``,
  ``cls_pt_norm``, ``cls_pt_lm_head``) dropped. The three share one key layout; auto-detection tells
  BEiT v2 by ``cls_pt_*`` and BEiT by ``lm_head`` and asks for ``--from`` otherwise.

Eva family (timm ``Eva``, see :mod:`mimbench.encoders.eva`; key renames in
:mod:`mimbench.encoders.eva_layouts`):

* ``dinov3`` - the official DINOv3 backbone (``storage_tokens``, ``ls1.gamma``, ``attn.qkv.bias`` with
  its NaN-initialised ``bias_mask``) or timm's ``vit_*_dinov3``; ``mask_token`` and rope buffers dropped.
* ``eva02`` - the official EVA-02 (asuka) or timm ``eva02_*`` names; rope buffers, ``lm_head`` dropped.

Hugging Face (a ``save_pretrained`` folder, detected by its ``config.json``, or its weights file alone; see
:mod:`mimbench.encoders.hf`): ``hf-vit``, ``hf-vitmae``, ``hf-dinov2``, ``hf-dinov2-registers`` and ``hf-ijepa``
to the ViT family, ``hf-beit`` and ``hf-data2vec-vision`` to the BEiT family, ``hf-dinov3`` to the Eva family.

Everywhere: a fine-tuned checkpoint whose final norm acts on pooled features only (``fc_norm``,
no ``norm``) is refused; a ``head`` is dropped; every other tensor must be used (strict), and the
dropped ones are named per module in ``source_dropped``. PyTorch files are read with
``torch.load(weights_only=True)``; checkpoints of the official training scripts also store their
``argparse.Namespace`` arguments, the only non-tensor class admitted (it carries plain values and
runs no code).
"""
from __future__ import annotations

import argparse
import math
import pickle
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mimbench.encoders.arch import arch_name, default_num_heads, mlp_hidden, parse_arch
from mimbench.encoders.beit import beit_metadata, rel_table_rows
from mimbench.encoders.dinov2 import DINOV2_INIT_VALUES, dinov2_to_timm, is_official_dinov2, is_timm_dinov2
from mimbench.encoders.eva import eva_metadata
from mimbench.encoders.eva_layouts import DINOV3_EPS, EVA02_EPS, eva_arch, eva_layout_of, eva_layout_state
from mimbench.encoders.file import FORMAT_TAG, check_tensors, encoder_metadata, encoder_sha256, save_encoder
from mimbench.encoders.hf import (
    detect_hf_layouts, hf_layouts, is_hf_folder, layout_of_config, map_hf_state, read_config, read_weights,
    weights_file,
)
from mimbench.encoders.ijepa import IJEPA_FLAGS, ijepa_part, is_official_ijepa
from mimbench.encoders.vit import num_prefix_tokens, vit_metadata
from mimbench.errors import MimbenchError

VIT_LAYOUTS = ("mae", "timm", "deit", "mmpretrain", "dino", "ibot", "mocov3", "vissl", "dinov2", "ijepa",
               "ijepa-context")
BEIT_LAYOUTS = ("beit", "beitv2", "data2vec-vision")
EVA_LAYOUTS = ("dinov3", "eva02")
HF_LAYOUTS = hf_layouts()
LAYOUTS = ("auto",) + VIT_LAYOUTS + BEIT_LAYOUTS + EVA_LAYOUTS + HF_LAYOUTS

_MAE_DECODER = ("decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.")
_MAE_DECODER_EXACT = ("decoder_pos_embed", "mask_token")
_HEAD = ("head.",)
_DISTILLED = ("dist_token", "head_dist.")
_TECHNIQUE = {"mae": "mae", "deit": "supervised-deit", "timm": "unknown", "mmpretrain": "unknown", "dino": "dino",
              "ibot": "ibot", "mocov3": "mocov3", "vissl": "unknown", "beit": "beit", "beitv2": "beitv2",
              "data2vec-vision": "data2vec", "dinov2": "dinov2", "ijepa": "ijepa",
              "ijepa-context": "ijepa", "dinov3": "dinov3", "eva02": "eva02", "hf-vit": "unknown",
              "hf-vitmae": "mae", "hf-beit": "beit", "hf-data2vec-vision": "data2vec", "hf-dinov2": "dinov2",
              "hf-dinov2-registers": "dinov2", "hf-ijepa": "ijepa", "hf-dinov3": "dinov3"}
_IJEPA = ("ijepa", "ijepa-context")
#: Layouts whose checkpoints store the epoch just finished counting from 0 (the others store the next one).
_EPOCH_FROM_ZERO = ("mae", "deit", "timm", "beit", "beitv2", "data2vec-vision")
_BEIT_MARKERS = ("q_bias", "v_bias", "relative_position_bias_table", "gamma_1", "gamma_2")
_BEIT_DROP = ("lm_head.", "cls_pt_", "head.")  # cls_pt_layers / cls_pt_norm / cls_pt_lm_head: BEiT v2
_BEIT_DROP_EXACT = ("mask_token",)

# mmpretrain VisionTransformer module names -> timm's (applied after stripping "backbone.")
_MMPRETRAIN_RENAMES = (
    (re.compile(r"^patch_embed\.projection\."), "patch_embed.proj."),
    (re.compile(r"^layers\.(\d+)\.ln1\."), r"blocks.\1.norm1."),
    (re.compile(r"^layers\.(\d+)\.ln2\."), r"blocks.\1.norm2."),
    (re.compile(r"^layers\.(\d+)\.attn\.(qkv|proj)\."), r"blocks.\1.attn.\2."),
    (re.compile(r"^layers\.(\d+)\.ffn\.layers\.0\.0\."), r"blocks.\1.mlp.fc1."),
    (re.compile(r"^layers\.(\d+)\.ffn\.layers\.1\."), r"blocks.\1.mlp.fc2."),
    (re.compile(r"^ln1\."), "norm."),
    (re.compile(r"^ln2\."), "fc_norm."),
)
_VISSL_RENAMES = {"class_token": "cls_token", "pos_embedding": "pos_embed"}


def _load_file(src: Path) -> object:
    """Read a checkpoint without running any pickled code."""
    if src.suffix == ".safetensors":
        try:
            with safe_open(str(src), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("format") == FORMAT_TAG:
                raise MimbenchError(f"{src} is already a mimbench encoder file.",
                                    "Use it directly; nothing to convert.")
            return load_file(str(src))
        except MimbenchError:
            raise
        except Exception as e:
            raise MimbenchError(f"{src} is not a readable safetensors file ({e}).",
                                "The file is corrupt or truncated; download it again.") from None
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":  # torch.save writes a zip archive; legacy files a pickle
        raise MimbenchError(f"{src} cannot be read as a PyTorch checkpoint (neither a zip archive nor a pickle: it "
                            f"starts with {magic!r}).", "The file is not a checkpoint, or is corrupt; download it again.")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()
        reason = next((ln.strip() for ln in lines if "GLOBAL" in ln or "Unsupported" in ln),
                      lines[0] if lines else "unsupported object")
        raise MimbenchError(
            f"{src} was refused for safety: loading it needs arbitrary unpickling, which can run code "
            f"(torch.load with weights_only=True says: {reason}).",
            "If you trust the file, re-save its weights only in a Python session that can load it: "
            "sd = torch.load(SRC, weights_only=False); sd = sd.get('model', sd); "
            "torch.save({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, 'weights.pth'), "
            "then use weights.pth.") from None
    except Exception as e:  # zip/format errors from torch.load
        raise MimbenchError(f"{src} cannot be read as a PyTorch checkpoint ({e}).",
                            "The file is corrupt, truncated or not a checkpoint.") from None


def _tensors(obj: object, src: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise MimbenchError(f"{src}: {what} is a {type(obj).__name__}, not a state dict.",
                            "Save the model's state_dict() (a dict of tensors).")
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise MimbenchError(f"{src}: entry {k!r} of {what} is a {type(v).__name__}, not a tensor.",
                                "Give a checkpoint whose weights are a flat dict of tensors.")
    return dict(obj)


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` when every key carries it (a DDP ``module.`` wrapper)."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _take_prefix(sd: dict[str, torch.Tensor], prefix: str, dropped: list[str],
                 skip: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` (not under ``skip``), renamed without it; every other key goes to ``dropped``."""
    out = {}
    for k, v in sd.items():
        if k.startswith(prefix) and not (skip and k.startswith(skip)):
            out[k[len(prefix):]] = v
        else:
            dropped.append(k)
    return out


def _state_dict(obj: object, src: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Unwrap ``{"model": ...}`` / ``{"state_dict": ...}`` / ``{"module": ...}`` and a DDP ``module.`` prefix."""
    if not isinstance(obj, dict):
        raise MimbenchError(f"{src} holds a {type(obj).__name__}, not a state dict.",
                            "Save the model's state_dict() (a dict of tensors).")
    wrapper = obj
    for key in ("model", "state_dict", "module"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    else:
        wrapper = {}
    return _strip(_tensors(obj, src, "the state dict"), "module."), wrapper


def _teacher_student(obj: object) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("teacher"), dict) and isinstance(obj.get("student"), dict)


def detect_layouts(obj: object) -> list[str]:
    """The layouts a loaded checkpoint can be in (one, or several when the keys cannot tell them apart)."""
    if not isinstance(obj, dict):
        return []
    if isinstance(obj.get("classy_state_dict"), dict):
        return ["vissl"]
    if is_official_ijepa(obj):
        return ["ijepa"]
    if _teacher_student(obj):
        keys = list(obj["teacher"]) + list(obj["student"])
        return ["ibot"] if "ibot_loss" in obj or any(k.endswith("masked_embed") for k in keys) else ["dino"]
    inner = obj
    for key in ("model", "state_dict", "module"):
        if isinstance(obj.get(key), dict):
            inner = obj[key]
            break
    keys = [k[len("module."):] if k.startswith("module.") else k for k in inner if isinstance(k, str)]
    hf = detect_hf_layouts(keys)
    if hf:
        return hf
    if any(k.startswith("base_encoder.") for k in keys):
        return ["mocov3"]
    # DINOv3 shares DINOv2's mask token and ls1.gamma: its own keys (storage tokens, rope) decide first
    eva = eva_layout_of({k[len("module."):] if k.startswith("module.") else k: v for k, v in inner.items()
                         if isinstance(k, str)})
    if is_official_dinov2(keys) and eva is None:
        return ["dinov2"]
    if any(k.startswith(("backbone.layers.", "backbone.patch_embed.projection.")) for k in keys):
        return ["mmpretrain"]
    if eva:
        return [eva]
    if any(k.startswith("rel_pos_bias.") or k.rsplit(".", 1)[-1] in _BEIT_MARKERS for k in keys):
        if any(k.startswith("cls_pt_") for k in keys):
            return ["beitv2"]
        if any(k.startswith("lm_head.") for k in keys):
            return ["beit"]
        return list(BEIT_LAYOUTS)
    if any(k.startswith("backbone.") for k in keys):  # a DINO/iBOT teacher or student saved on its own
        return ["ibot"] if any(k.endswith("masked_embed") for k in keys) else ["dino", "ibot"]
    if any(k.startswith(_MAE_DECODER) or k in _MAE_DECODER_EXACT for k in keys):
        return ["mae"]
    if any(k.startswith(_DISTILLED) for k in keys):
        return ["deit"]
    if "masked_embed" in keys:
        return ["ibot"]
    stripped = {k[len("module."):] if k.startswith("module.") else k: v for k, v in inner.items()
                if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return ["dinov2"] if is_timm_dinov2(stripped) else ["timm"]


def _extract(obj: object, layout: str, src: Path) -> tuple[dict[str, torch.Tensor], list[str], dict]:
    """(encoder-candidate tensors under their source names, names dropped while unwrapping, wrapper dict)."""
    dropped: list[str] = []
    if layout in _IJEPA and is_official_ijepa(obj):
        part, net, dropped = ijepa_part(obj, src, "encoder" if layout == "ijepa-context" else None)
        return _strip(_tensors(net, src, f"the {part}"), "module."), dropped, obj
    if layout == "vissl":
        try:
            model = obj["classy_state_dict"]["base_model"]["model"]
            trunk = model["trunk"]
        except (KeyError, TypeError):
            raise MimbenchError(f"{src} has no classy_state_dict.base_model.model.trunk, where VISSL keeps the trunk.",
                                "Give a VISSL training checkpoint (model_final_checkpoint_phase*.torch).") from None
        dropped += [f"heads.{k}" for k in (model.get("heads") or {})]
        sd = _strip(_tensors(trunk, src, "the VISSL trunk"), "module.")
        return {_VISSL_RENAMES.get(k, k): v for k, v in sd.items()}, dropped, obj
    if layout in ("dino", "ibot") and _teacher_student(obj):
        sd = _strip(_tensors(obj["teacher"], src, "the teacher"), "module.")
        out = _take_prefix(sd, "backbone.", dropped)
        if not out:
            raise MimbenchError(f"{src}: the teacher has no backbone.* tensors.", "Is this a DINO/iBOT checkpoint?")
        return out, dropped, obj
    sd, wrapper = _state_dict(obj, src)
    if layout in ("dino", "ibot") and any(k.startswith("backbone.") for k in sd):
        return _take_prefix(sd, "backbone.", dropped), dropped, wrapper
    if layout == "mocov3":
        out = _take_prefix(sd, "base_encoder.", dropped, skip="base_encoder.head.")
        if not out:
            raise MimbenchError(f"{src}: no base_encoder.* tensors.", "Is this a MoCo v3 checkpoint (.pth.tar)?")
        return out, dropped, wrapper
    if layout == "mmpretrain":
        out = {}
        for k, v in sd.items():
            if not k.startswith("backbone."):
                dropped.append(k)
                continue
            name = k[len("backbone."):]
            for pattern, repl in _MMPRETRAIN_RENAMES:
                new, n = pattern.subn(repl, name)
                if n:
                    name = new
                    break
            out[name] = v
        return out, dropped, wrapper
    return sd, dropped, wrapper


def _refuse_pooled_only(sd: dict[str, torch.Tensor], src: Path) -> list[str]:
    """fc_norm next to norm is dropped; fc_norm alone (a pooled-feature norm) cannot be an encoder."""
    if not any(k.startswith("fc_norm.") for k in sd):
        return []
    if "norm.weight" not in sd:
        raise MimbenchError(
            f"{src} was fine-tuned with global average pooling: it has fc_norm (a norm of the pooled feature) "
            "and no per-token final norm, so it cannot be stored as a token-level encoder.",
            "Use the pre-training checkpoint of that model instead (e.g. MAE's mae_pretrain_vit_*.pth, "
            "BEiT's *_pt22k.pth).")
    return [k for k in sd if k.startswith("fc_norm.")]


def _drop_vit(sd: dict[str, torch.Tensor], layout: str, src: Path) -> list[str]:
    """Remove tensors that are not part of a ViT encoder; return their names."""
    if any(k.startswith(_DISTILLED) for k in sd):
        raise MimbenchError(
            f"{src} is a distilled DeiT checkpoint (it has a distillation token: "
            f"{', '.join(sorted(k for k in sd if k.startswith(_DISTILLED))[:3])}).",
            "Only single-class-token ViTs fit the encoder format; use the non-distilled DeiT weights.")
    drop = [k for k in sd if k.startswith(_HEAD)]
    if layout == "mae":
        drop += [k for k in sd if k.startswith(_MAE_DECODER) or k in _MAE_DECODER_EXACT]
    if layout == "ibot":
        drop += [k for k in sd if k == "masked_embed"]
    drop += _refuse_pooled_only(sd, src)
    for k in drop:
        del sd[k]
    return drop


def _drop_beit(sd: dict[str, torch.Tensor], src: Path) -> list[str]:
    drop = [k for k in sd if k.startswith(_BEIT_DROP) or k in _BEIT_DROP_EXACT or k.endswith("relative_position_index")]
    drop += _refuse_pooled_only(sd, src)
    for k in drop:
        del sd[k]
    return drop


def _count_blocks(sd) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})


def _common_arch(sd: dict[str, torch.Tensor], src: Path, num_heads: int | None, hint: str,
                 class_token: bool = True) -> dict:
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4 or (class_token and "cls_token" not in sd):
        absent = [k for k in ("patch_embed.proj.weight",) + ("cls_token",) * class_token if k not in sd]
        raise MimbenchError(
            f"{src} does not look like a ViT{' with a class token' * class_token} (absent: "
            f"{', '.join(absent) or 'none'}; first keys: {', '.join(list(sd)[:6])}).", hint)
    if w.shape[2] != w.shape[3]:
        raise MimbenchError(f"{src}: non-square patches {tuple(w.shape[2:])} are not supported.",
                            "Only square patches are supported.")
    embed_dim, patch = int(w.shape[0]), int(w.shape[2])
    depth = _count_blocks(sd)
    if depth == 0 or "blocks.0.mlp.fc1.weight" not in sd:
        raise MimbenchError(f"{src}: no transformer blocks found (blocks.<i>.*).", hint)
    hidden = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
    mlp_ratio = hidden / embed_dim
    if mlp_hidden(embed_dim, mlp_ratio) != hidden:  # guard float rounding for odd widths
        mlp_ratio = (hidden + 0.5) / embed_dim
    heads = num_heads or default_num_heads(embed_dim, depth)
    if not heads or embed_dim % heads:
        raise MimbenchError(
            f"{src}: the number of attention heads cannot be inferred for embed_dim {embed_dim}"
            + (f" (given {num_heads} does not divide it)" if num_heads else "") + ".",
            "Pass num_heads explicitly (convert_checkpoint(..., num_heads=H)).")
    return dict(patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio)


def _grid_from_pos_embed(pos: torch.Tensor, src: Path) -> int:
    n_pos = int(pos.shape[1])
    grid = math.isqrt(n_pos - 1)
    if pos.ndim != 3 or grid * grid != n_pos - 1:
        hint = (" It looks like position embeddings without a class position (timm no_embed_class)."
                if math.isqrt(n_pos) ** 2 == n_pos else "")
        raise MimbenchError(f"{src}: pos_embed has {n_pos} positions, not 1 + a square patch grid.{hint}",
                            "Only square grids with the class position included are supported.")
    return grid


def _vit_flags(sd: dict[str, torch.Tensor]) -> dict:
    """ViT-family fields read off a timm-named state dict: class token, registers, layer scale, and whether the
    position embedding leaves out the prefix tokens (only with registers or without class token)."""
    flags: dict = {"class_token": "cls_token" in sd, "reg_tokens": 0}
    if isinstance(sd.get("reg_token"), torch.Tensor) and sd["reg_token"].ndim == 3:
        flags["reg_tokens"] = int(sd["reg_token"].shape[1])
    if any(k.endswith("ls1.gamma") for k in sd):
        flags["init_values"] = DINOV2_INIT_VALUES  # the initial value is not stored; the gammas are what count
    if not flags["class_token"]:
        flags["global_pool"] = "avg"
    prefix, pos = num_prefix_tokens(flags), sd.get("pos_embed")
    if prefix and (flags["reg_tokens"] or not flags["class_token"]) and isinstance(pos, torch.Tensor) and pos.ndim == 3:
        n = int(pos.shape[1])
        flags["no_embed_class"] = math.isqrt(n) ** 2 == n and math.isqrt(n - prefix) ** 2 != n - prefix
    return flags


def _vit_arch(sd, src, num_heads, flags: dict) -> dict:
    hint = ("Supported layouts: " + ", ".join(LAYOUTS[1:]) + " (docs/checkpoints.md); force one with --from.")
    arch = _common_arch(sd, src, num_heads, hint, class_token=bool(flags.get("class_token", True)))
    if "pos_embed" not in sd:
        raise MimbenchError(f"{src}: no pos_embed: not a ViT with absolute position embeddings.", hint)
    prefix = 0 if flags.get("no_embed_class") else num_prefix_tokens(flags)
    if prefix == 1:
        grid = _grid_from_pos_embed(sd["pos_embed"], src)
    else:
        n_pos = int(sd["pos_embed"].shape[1])
        grid = math.isqrt(max(n_pos - prefix, 0))
        if grid * grid != n_pos - prefix:
            raise MimbenchError(f"{src}: pos_embed has {n_pos} positions, not {prefix} prefix positions + a square "
                                "patch grid.", "Only square grids are supported.")
    arch["img_size"] = grid * arch["patch_size"]
    return arch


def _beit_arch(sd, src, num_heads) -> tuple[dict, dict]:
    hint = "Supported BEiT-family checkpoints are those of the unilm BEiT / BEiT v2 / data2vec code (docs/checkpoints.md)."
    arch = _common_arch(sd, src, num_heads, hint)
    flags = {
        "use_abs_pos_emb": "pos_embed" in sd,
        "use_shared_rel_pos_bias": "rel_pos_bias.relative_position_bias_table" in sd,
        "use_rel_pos_bias": "blocks.0.attn.relative_position_bias_table" in sd,
        # the initial value is not stored in checkpoints; BEiT's base default is recorded, the gammas are what count
        "layer_scale_init_value": 0.1 if "blocks.0.gamma_1" in sd else 0.0,
    }
    table = sd.get("rel_pos_bias.relative_position_bias_table", sd.get("blocks.0.attn.relative_position_bias_table"))
    if flags["use_abs_pos_emb"]:
        grid = _grid_from_pos_embed(sd["pos_embed"], src)
    elif table is not None:
        grid = (math.isqrt(int(table.shape[0]) - 3) + 1) // 2
        if rel_table_rows(grid) != table.shape[0]:
            raise MimbenchError(f"{src}: a relative position bias table of {table.shape[0]} rows does not belong to "
                                "a square patch grid.", hint)
    else:
        raise MimbenchError(f"{src}: neither absolute position embeddings nor relative position bias.", hint)
    if table is not None and num_heads is None:
        arch["num_heads"] = int(table.shape[1])  # the tables have one column per head
    if "blocks.0.attn.q_bias" not in sd:
        raise MimbenchError(f"{src}: a BEiT-style checkpoint without attn.q_bias/v_bias is not supported.", hint)
    arch["img_size"] = grid * arch["patch_size"]
    return arch, flags


def check_layout(layout: str) -> str:
    """``layout`` if it is one of :data:`LAYOUTS`, else MimbenchError listing them."""
    if layout not in LAYOUTS:
        raise MimbenchError(f"Unknown checkpoint layout {layout!r}.", f"Use one of: {', '.join(LAYOUTS)}.")
    return layout


def _resolve_layout(obj: object, layout: str, src: Path) -> str:
    if check_layout(layout) != "auto":
        return layout
    found = detect_layouts(obj)
    if not found:
        raise MimbenchError(f"{src} holds a {type(obj).__name__}, not a checkpoint dict.",
                            "Give a model checkpoint (a dict of tensors, possibly wrapped).")
    if len(found) > 1:
        raise MimbenchError(
            f"{src}: the layout cannot be told apart from the keys; it could be any of {', '.join(found)} "
            "(they share one key layout and differ in what is recorded as the technique).",
            f"Say which with --from {found[0]} (or layout={found[0]!r}); candidates: {', '.join(found)}.")
    return found[0]


def _stored_epochs(wrapper, layout: str) -> float:
    """Epochs trained, from the checkpoint's ``epoch`` field (+1 for the layouts that count from 0); 0 = unknown."""
    epoch = wrapper.get("epoch") if isinstance(wrapper, dict) else None
    if isinstance(epoch, (int, float)) and not isinstance(epoch, bool):
        return float(epoch) + (1 if layout in _EPOCH_FROM_ZERO else 0)
    return 0.0


def convert_state(src, layout: str = "auto", *, num_heads: int | None = None, technique: str | None = None,
                  epochs: float | None = None, data: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of the encoder in checkpoint ``src``, checked, nothing written.

    Args:
        layout: one of :data:`LAYOUTS` ("auto" detects; several candidates -> error naming them).
        num_heads: attention heads, needed only for non-standard ViT widths (standard sizes use
            :data:`mimbench.encoders.STANDARD_VITS`, otherwise 64-dim heads; BEiT-family
            checkpoints tell it by their relative-position tables).
        technique / epochs / data: provenance for the metadata. Defaults: technique from the layout;
            epochs from the checkpoint's ``epoch`` field when present (+1 for the layouts that count
            from 0), else 0 (unknown).

    The metadata records ``source`` (file name), ``source_sha256``, ``source_layout`` and
    ``source_dropped`` (tensors left out on purpose, per module).
    """
    src = Path(src)
    provenance = dict(technique=technique, epochs=epochs, data=data)
    if is_hf_folder(src):
        config = read_config(src)
        found = layout_of_config(config, str(src))  # an unsupported architecture stops here, before any weights
        layout = found if check_layout(layout) == "auto" else layout
        if layout not in HF_LAYOUTS:
            raise MimbenchError(f"{src} is a Hugging Face model folder; layout {layout!r} does not apply to it.",
                                f"Leave out --from, or use one of {', '.join(HF_LAYOUTS)}.")
        return _convert_hf(read_weights(weights_file(src)), config, layout, src, provenance)
    if not src.is_file():
        raise MimbenchError(f"Checkpoint {src} does not exist or is not a file.", "Check the path.")
    obj = _load_file(src)
    layout = _resolve_layout(obj, layout, src)
    if layout in HF_LAYOUTS:
        return _convert_hf(_tensors(obj, src, "the weights"), {}, layout, src, provenance)
    sd, dropped, wrapper = _extract(obj, layout, src)
    extra: dict[str, str] = {}
    family = "beit" if layout in BEIT_LAYOUTS else "eva" if layout in EVA_LAYOUTS else "vit"
    if family == "eva":
        sd, eva_dropped = eva_layout_state(sd, layout, src)
        dropped += eva_dropped
        arch, flags = eva_arch(sd, layout, src, num_heads)
        extra.update(eva_metadata(flags) | {"norm_eps": DINOV3_EPS if layout == "dinov3" else EVA02_EPS})
    elif family == "beit":
        dropped += _drop_beit(sd, src)
        arch, flags = _beit_arch(sd, src, num_heads)
        extra.update(beit_metadata(flags))
    else:
        if any(k.rsplit(".", 1)[-1] in _BEIT_MARKERS for k in sd):
            raise MimbenchError(f"{src} has BEiT-style tensors (q_bias, relative position bias or layer scale), "
                                f"which a {layout} ViT does not have.",
                                f"Use --from with one of {', '.join(BEIT_LAYOUTS)} (or auto).")
        if layout == "dinov2":
            sd, flags, more = dinov2_to_timm(sd, str(src))
            dropped += more
        else:
            flags = dict(IJEPA_FLAGS) if layout in _IJEPA else _vit_flags(sd)
        if layout in _IJEPA and is_official_ijepa(obj):
            extra["source_part"] = ijepa_part(obj, src, "encoder" if layout == "ijepa-context" else None)[0]
        dropped += _drop_vit(sd, layout, src)
        arch = _vit_arch(sd, src, num_heads, flags)
        extra.update(vit_metadata(flags))
        filled = []
        for i in range(arch["depth"]):
            w, b = sd.get(f"blocks.{i}.attn.qkv.weight"), f"blocks.{i}.attn.qkv.bias"
            if w is not None and b not in sd and layout == "vissl":
                sd[b] = torch.zeros(w.shape[0], dtype=w.dtype)
                filled.append(b)
        if filled:
            extra["source_filled"] = f"attn.qkv.bias({len(filled)}, zeros: trained without qkv bias)"
        if layout == "vissl":
            extra["norm_eps"] = "1e-05"
    if epochs is None:
        epochs = _stored_epochs(wrapper, layout)
    extra.update({"source_sha256": encoder_sha256(src), "source_layout": layout, "source_dropped": _summarize(dropped)})
    meta = encoder_metadata(arch=arch_name(arch["embed_dim"], arch["depth"], arch["patch_size"]),
                            technique=technique or _TECHNIQUE[layout], epochs=epochs, data=data, source=src.name,
                            family=family, extra=extra, where=str(src), **arch)
    tensors = {k: v.detach().contiguous() for k, v in sd.items()}
    check_tensors({k: tuple(v.shape) for k, v in tensors.items()}, meta, parse_arch(meta, str(src)),
                  f"{src} (read as {layout})")
    return tensors, meta


def _convert_hf(state: dict[str, torch.Tensor], config: dict, layout: str, src: Path,
                provenance: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An HF state (and its config.json, ``{}`` without one) -> checked encoder tensors and metadata."""
    tensors, fields = map_hf_state(state, config, layout, str(src))
    arch = fields["arch"]
    extra = {**fields["extra"], "source_sha256": encoder_sha256(src), "source_layout": layout,
             "source_dropped": _summarize(fields["dropped"])}
    meta = encoder_metadata(arch=arch_name(arch["embed_dim"], arch["depth"], arch["patch_size"]),
                            technique=provenance["technique"] or _TECHNIQUE[layout],
                            epochs=provenance["epochs"] or 0.0, data=provenance["data"], source=src.name,
                            family=fields["family"], extra=extra, where=str(src), **arch)
    check_tensors({k: tuple(v.shape) for k, v in tensors.items()}, meta, parse_arch(meta, str(src)),
                  f"{src} (read as {layout})")
    return tensors, meta


def _summarize(names: list[str]) -> str:
    """``decoder_blocks(96),head(2)``: dropped tensors grouped by top-level module."""
    counts: dict[str, int] = {}
    for k in names:
        top = k.split(".")[0]
        counts[top] = counts.get(top, 0) + 1
    return ",".join(f"{k}({n})" for k, n in sorted(counts.items()))


_CACHE: dict[tuple, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}


def convert_in_memory(src, layout: str = "auto") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`convert_state` with default provenance, remembered for the last file (an evaluation
    reads its encoder several times: metadata, train and validation features, the record)."""
    src = Path(src)
    st = (weights_file(src) if is_hf_folder(src) else src).stat()
    key = (str(src.resolve()), st.st_size, st.st_mtime_ns, layout)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = convert_state(src, layout)
    tensors, meta = _CACHE[key]
    return dict(tensors), dict(meta)


def convert_checkpoint(src, dst, layout: str = "auto", *, num_heads: int | None = None,
                       technique: str | None = None, epochs: float | None = None, data: str = "") -> Path:
    """Convert the checkpoint ``src`` into the encoder file ``dst`` (arguments as :func:`convert_state`)."""
    src, dst = Path(src), Path(dst)
    tensors, meta = convert_state(src, layout, num_heads=num_heads, technique=technique, epochs=epochs, data=data)
    standard = ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "technique", "config_sha256",
                "epochs", "data", "source", "mlp_ratio")
    fields = parse_arch(meta, str(src))
    extra = {k: v for k, v in meta.items() if k not in standard and k not in ("format", "code_version", "family")}
    return save_encoder(tensors, dst, arch=meta["arch"], img_size=int(fields["img_size"]),
                        patch_size=int(fields["patch_size"]), embed_dim=int(fields["embed_dim"]),
                        depth=int(fields["depth"]), num_heads=int(fields["num_heads"]), technique=meta["technique"],
                        config_sha256=meta["config_sha256"], epochs=float(meta["epochs"]), data=meta["data"],
                        source=meta["source"], mlp_ratio=float(meta["mlp_ratio"]),
                        family=meta.get("family", "vit"), extra=extra)
