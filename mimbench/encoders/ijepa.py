"""I-JEPA checkpoints (official and Hugging Face) as ViT-family encoder tensors without a class token.

Official layout (facebookresearch/ijepa ``src/train.py`` ``save_checkpoint``, ``src/models/vision_transformer.py``):
a dict with ``encoder`` (the context encoder), ``predictor``, ``target_encoder`` (the EMA encoder),
``opt``, ``scaler``, ``epoch``, ...; every network's keys carry the DDP prefix ``module.``. The
encoder is a timm-named ViT without class token: ``pos_embed`` (1, N, D) (a fixed 2-D sin-cos table
stored as a parameter), ``patch_embed.proj``, ``blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2}``, ``norm``; LayerNorm eps 1e-6. The paper evaluates the target encoder with the mean of its
last layer's normed patch tokens (App. A.1), so the target encoder is read by default and the part used
is recorded (``source_part``); the other parts are named in ``source_dropped``. Hugging Face's
``IJepaModel`` (a conversion of the context encoder) is read by :func:`hf_ijepa_state`; its config's
``layer_norm_eps`` is kept (``norm_eps``).

Encoder files: ``class_token=false``, ``global_pool=avg``; the position grid is resampled directly
(bicubic, no prefix), since the official ``interpolate_pos_encoding`` assumes a class slot.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from mimbench.encoders.dinov2 import hf_config_arch, hf_encoder, hf_to_timm
from mimbench.errors import MimbenchError

#: The official checkpoint's networks, the one read by default first.
IJEPA_PARTS = ("target_encoder", "encoder")
IJEPA_FLAGS = {"class_token": False, "global_pool": "avg"}


def is_official_ijepa(obj: object) -> bool:
    """An official I-JEPA training checkpoint: a target encoder, or a context encoder next to a predictor."""
    return isinstance(obj, dict) and (isinstance(obj.get("target_encoder"), dict)
                                      or (isinstance(obj.get("encoder"), dict) and isinstance(obj.get("predictor"), dict)))


def ijepa_part(obj: Mapping, src: Path, part: str | None = None) -> tuple[str, dict, list[str]]:
    """``(part read, its state dict with "module." kept, names of the other parts' tensors)``."""
    if part is None:
        part = next((p for p in IJEPA_PARTS if isinstance(obj.get(p), dict)), None)
    if part not in IJEPA_PARTS or not isinstance(obj.get(part), dict):
        raise MimbenchError(f"{src}: no I-JEPA network {part!r} (parts found: "
                            f"{', '.join(k for k, v in obj.items() if isinstance(v, dict)) or 'none'}).",
                            f"Give an I-JEPA training checkpoint with one of {', '.join(IJEPA_PARTS)}.")
    dropped = [f"{name}.{k}" for name, net in obj.items() if name != part and name in IJEPA_PARTS + ("predictor",)
               and isinstance(net, dict) for k in net]
    return part, obj[part], dropped


def hf_ijepa_state(state: Mapping[str, torch.Tensor], config: Mapping,
                   where: str = "IJepaModel") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An HF ``IJepaModel`` state dict + its ``config.json`` dict -> ``(encoder tensors, metadata)``: no class
    token, mean pooling of the normed patch tokens, eps from the config (HF's default is 1e-12)."""
    tensors, dropped = hf_to_timm(state, where)
    if "cls_token" in tensors:
        raise MimbenchError(f"{where}: an I-JEPA model has no class token, these weights do.",
                            "Use the Dinov2Model reader for DINOv2 weights.")
    width = config.get("intermediate_size")
    if width is None and "blocks.0.mlp.fc1.weight" in tensors:
        width = tensors["blocks.0.mlp.fc1.weight"].shape[0]
    arch = hf_config_arch(config, where, mlp_width=int(width) if width is not None else None)
    arch["norm_eps"] = float(config.get("layer_norm_eps", 1e-12))
    return hf_encoder(tensors, arch, IJEPA_FLAGS, technique="ijepa", layout="hf-ijepa", dropped=dropped,
                      config=config, where=where)
