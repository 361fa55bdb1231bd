"""The numeric architecture of an encoder: standard ViT sizes, readable names, and the metadata fields that fix it.

Shared by the file format (:mod:`mimbench.encoders.file`), the families' shape tables and builders and the
converters; it depends on nothing else in :mod:`mimbench.encoders`.
"""
from __future__ import annotations

from typing import Mapping

from mimbench.errors import MimbenchError

INT_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
FLOAT_FIELDS = ("mlp_ratio", "epochs")

#: Short names of the standard ViT sizes, keyed by (embed_dim, depth) -> (name, num_heads).
#: The head count cannot be read off the weights (qkv is D x 3D whatever the split), so
#: converters take it from this table; ViT-H and ViT-g use 16 heads although D/64 would say 20/22.
STANDARD_VITS = {
    (192, 12): ("vit-ti", 3),
    (384, 12): ("vit-s", 6),
    (768, 12): ("vit-b", 12),
    (1024, 24): ("vit-l", 16),
    (1280, 32): ("vit-h", 16),
    (1408, 40): ("vit-g", 16),
}


def arch_name(embed_dim: int, depth: int, patch_size: int) -> str:
    """Readable architecture name, e.g. ``vit-b/16``; non-standard sizes read ``vit-d128x6/4``."""
    std = STANDARD_VITS.get((embed_dim, depth))
    base = std[0] if std else f"vit-d{embed_dim}x{depth}"
    return f"{base}/{patch_size}"


def default_num_heads(embed_dim: int, depth: int) -> int | None:
    """Head count of a standard size (:data:`STANDARD_VITS`), else 64-dim heads when D divides; None otherwise."""
    std = STANDARD_VITS.get((embed_dim, depth))
    if std:
        return std[1]
    return embed_dim // 64 if embed_dim % 64 == 0 else None


def mlp_hidden(embed_dim: int, mlp_ratio: float) -> int:
    """Hidden width of the MLP as timm computes it: int(D * mlp_ratio)."""
    return int(embed_dim * mlp_ratio)


def parse_arch(meta: Mapping[str, str], where: str = "encoder file") -> dict[str, float]:
    """Numeric architecture fields of the metadata: ints for sizes, floats for mlp_ratio/epochs."""
    out: dict[str, float] = {}
    for k in INT_FIELDS + FLOAT_FIELDS:
        try:
            out[k] = int(meta[k]) if k in INT_FIELDS else float(meta[k])
        except (KeyError, ValueError):
            raise MimbenchError(f"{where}: metadata field {k!r} is {meta.get(k)!r}, not a number.",
                                "Re-export or re-convert the encoder.") from None
    if out["embed_dim"] % out["num_heads"]:
        raise MimbenchError(f"{where}: embed_dim {out['embed_dim']} is not divisible by num_heads {out['num_heads']}.",
                            "Re-export or re-convert the encoder with a valid head count.")
    if out["img_size"] % out["patch_size"]:
        raise MimbenchError(f"{where}: img_size {out['img_size']} is not a multiple of patch_size {out['patch_size']}.",
                            "Re-export or re-convert the encoder.")
    return out


def norm_eps(meta: Mapping[str, str], where: str = "encoder file") -> float:
    """LayerNorm epsilon of the encoder: the ``norm_eps`` field, 1e-6 when absent."""
    try:
        return float(meta.get("norm_eps", "1e-06"))
    except ValueError:
        raise MimbenchError(f"{where}: metadata field 'norm_eps' is {meta.get('norm_eps')!r}, not a number.",
                            "Re-export or re-convert the encoder.") from None
