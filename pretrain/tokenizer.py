"""Visual tokenizer files for BEiT v2-style pre-training: reading them back, and official checkpoints.

Interface (:class:`pretrain.contract.VisualTokenizer`)
    ``num_tokens`` (vocabulary size), ``grid_size`` (``(H, W)`` token grid, one token per patch of
    the pre-trained encoder) and ``tokenize(imgs) -> N x L int64`` (row-major patch order), run
    without gradient. BEiT v2 pre-training needs nothing else, so any tokenizer that implements
    these three names can be plugged in. The one model this project trains is VQ-KD
    (:mod:`pretrain.models.vqkd`).

Files
    ``tokenizer.safetensors`` (written by :meth:`pretrain.models.vqkd.VQKD.save`: tensors = the
    model without the teacher, metadata ``format=mimbench-tokenizer/1`` and the constructor
    arguments as JSON) or an official BEiT v2 ``.pth`` checkpoint (``{"model": state_dict}``), both
    read by :func:`load_tokenizer`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mimbench.errors import MimbenchError
from pretrain.models.vqkd import TOKENIZER_FORMAT, VQKD

# ---------------------------------------------------------------------- loading
_OFFICIAL_DROPPED_PREFIXES = ("teacher", "scaling_layer", "loss")
#: Official quantiser keys -> this model's (the EmbeddingEMA's ``cluster_size`` and ``embed_avg``
#: are not used by the normalised EMA update and are dropped).
_OFFICIAL_QUANTIZER_KEYS = {
    "quantize.embedding.weight": "quantize.codebook",
    "quantize.cluster_size": "quantize.usage",
    "quantize.embedding.initted": "quantize.initialized",
}
_OFFICIAL_UNUSED = ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg")


def _count_blocks(sd, prefix: str) -> int:
    n = 0
    while f"{prefix}.blocks.{n}.norm1.weight" in sd:
        n += 1
    return n


def official_vqkd_config(sd: dict[str, torch.Tensor], num_heads: int | None = None,
                         decoder_num_heads: int | None = None) -> dict:
    """Constructor arguments of :class:`VQKD` read off an official state dict's shapes (head counts
    cannot be read off weights: 64-dim heads unless given; BEiT v2's tokenizers use 12 of 64)."""
    try:
        embed_dim = int(sd["encoder.cls_token"].shape[-1])
        proj = sd["encoder.patch_embed.proj.weight"]
        patch = int(proj.shape[-1])
        grid = math.isqrt(int(sd["encoder.pos_embed"].shape[1]) - 1)
        dec_dim = int(sd["decoder.cls_token"].shape[-1])
        code_dim = int(sd["decoder.patch_embed.proj.weight"].shape[1])
        num_tokens = int(sd["quantize.embedding.weight"].shape[0])
        teacher_dim = int(sd["decode_task_layer.2.weight"].shape[0])
        mlp_ratio = sd["encoder.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    except KeyError as e:
        raise MimbenchError(f"Not a BEiT v2 VQ-KD state dict: key {e} is missing.",
                            "Give the official tokenizer checkpoint (e.g. vqkd_encoder_base_decoder_3x768x12_clip-*.pth) "
                            "or a mimbench tokenizer.safetensors.") from None
    return dict(img_size=grid * patch, patch_size=patch, in_chans=int(proj.shape[1]), embed_dim=embed_dim,
                depth=_count_blocks(sd, "encoder"), num_heads=int(num_heads or max(embed_dim // 64, 1)),
                mlp_ratio=float(mlp_ratio), decoder_depth=_count_blocks(sd, "decoder"), decoder_embed_dim=dec_dim,
                decoder_num_heads=int(decoder_num_heads or max(dec_dim // 64, 1)), num_tokens=num_tokens,
                code_dim=code_dim, teacher_dim=teacher_dim, input_scaling="imagenet_to_pm1")


def map_official_vqkd(sd: dict[str, torch.Tensor], model: VQKD) -> dict[str, torch.Tensor]:
    """Official VQ-KD state dict -> ``model``'s (no teacher) strictly: every official key is mapped,
    or dropped by name (teacher/scaling/loss, the two unused EMA statistics); every model tensor is
    filled, with its exact shape. Anything else raises :class:`MimbenchError` naming the keys."""
    want = model.tokenizer_state_dict()
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for k, v in sd.items():
        if k.startswith(_OFFICIAL_DROPPED_PREFIXES) or k in _OFFICIAL_UNUSED:
            continue
        name = _OFFICIAL_QUANTIZER_KEYS.get(k, k)
        if name not in want:
            unexpected.append(k)
            continue
        if name == "quantize.initialized":
            v = v.reshape(()).bool()
        out[name] = v
    missing = sorted(set(want) - set(out))
    wrong = [f"{k}: {tuple(out[k].shape)} (expected {tuple(want[k].shape)})" for k in sorted(out)
             if tuple(out[k].shape) != tuple(want[k].shape)]
    if unexpected or missing or wrong:
        parts = []
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(sorted(unexpected)[:8])}")
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:8])}")
        if wrong:
            parts.append(f"wrong shapes: {'; '.join(wrong[:6])}")
        raise MimbenchError("The tokenizer checkpoint does not match the VQ-KD layout (" + "; ".join(parts) + ").",
                            "Give an official BEiT v2 VQ-KD checkpoint unchanged, with num_heads if it is not 64-dim.")
    return out


def load_official_vqkd(path, num_heads: int | None = None, decoder_num_heads: int | None = None) -> VQKD:
    """Build :class:`VQKD` from an official BEiT v2 tokenizer checkpoint (``.pth``: ``{"model": ...}``,
    ``{"state_dict": ...}`` or the state dict itself), read with ``torch.load(weights_only=True)``."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refuses code objects; torch raises several error types
        raise MimbenchError(f"Cannot read tokenizer checkpoint {path} safely ({type(e).__name__}: {e}).",
                            "Give a plain PyTorch state-dict file (tensors only) or a tokenizer.safetensors.") from None
    sd = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MimbenchError(f"{path} holds no tensor state dict.", "Give the official VQ-KD checkpoint file.")
    model = VQKD(**official_vqkd_config(sd, num_heads, decoder_num_heads), kmeans_init=False)
    model.load_state_dict(map_official_vqkd(sd, model), strict=False)
    model.teacher_path = f"official:{path.name}"
    return model.eval()


def load_tokenizer(path, **kwargs) -> VQKD:
    """A tokenizer from ``tokenizer.safetensors`` (this project) or an official ``.pth``; frozen, eval mode."""
    path = Path(path)
    if not path.is_file():
        raise MimbenchError(f"Tokenizer file {path} does not exist.",
                            "Train one with `mimbench pretrain pretrain/configs/vqkd_tiny_fmnist.py` "
                            "or give the official BEiT v2 VQ-KD checkpoint.")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
        if md.get("format") != TOKENIZER_FORMAT:
            raise MimbenchError(f"{path} is not a mimbench tokenizer file (format={md.get('format')!r}).",
                                "Give a tokenizer.safetensors written by `mimbench pretrain` with a VQ-KD config.")
        cfg = json.loads(md["config"])
        model = VQKD(**cfg)
        model.load_state_dict(load_file(str(path)), strict=True)
        model.teacher_path = md.get("teacher") or None
    else:
        model = load_official_vqkd(path, **kwargs)
    model.requires_grad_(False)
    return model.eval()
