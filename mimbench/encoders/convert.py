"""Convert foreign ViT checkpoints into encoder files.

Supported layouts (all already use timm's VisionTransformer key names for the encoder):

* ``mae``  - official MAE checkpoints: ``{"model": state_dict, ...}``. Pre-training checkpoints
  also hold the decoder (``decoder_embed``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``,
  ``decoder_pos_embed``) and ``mask_token``; these are dropped. Fine-tuned ones hold ``head`` and,
  with global pooling, ``fc_norm`` instead of ``norm``; the head is dropped, and a checkpoint
  without a per-token ``norm`` is refused (its final norm acts on pooled features only).
* ``timm`` - a plain timm ViT state dict (.pth/.bin/.safetensors); ``head`` (and ``fc_norm``
  next to ``norm``) dropped.
* ``deit`` - DeiT checkpoints (``{"model": ...}``); distilled models (``dist_token``,
  ``head_dist``) are refused: their second token has no counterpart in the encoder format.
* ``mmpretrain`` - mmpretrain/mmselfsup ViT checkpoints (``{"state_dict": ...}``, encoder under
  ``backbone.``; MAE's decoder under ``neck.``, dropped). Their own module names are mapped to
  timm's: ``patch_embed.projection`` -> ``patch_embed.proj``, ``layers.i.ln1/ln2`` ->
  ``blocks.i.norm1/norm2``, ``layers.i.ffn.layers.0.0`` / ``.layers.1`` -> ``blocks.i.mlp.fc1`` /
  ``.fc2``, final ``ln1`` -> ``norm`` and the pooled-feature ``ln2`` -> ``fc_norm``.

Dropped tensors are counted per module in the ``source_dropped`` metadata field of the output.
PyTorch files are always read with ``torch.load(weights_only=True)``; checkpoints of the
official training scripts also store their ``argparse.Namespace`` arguments, which is the
only non-tensor class admitted (it carries plain values and runs no code).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import pickle
import re
from pathlib import Path

import torch

from mimbench.errors import MimbenchError
from mimbench.encoders.format import FORMAT_TAG, arch_name, default_num_heads, mlp_hidden, save_encoder

LAYOUTS = ("auto", "mae", "timm", "deit", "mmpretrain")

_MAE_DECODER = ("decoder_embed.", "decoder_blocks.", "decoder_norm.", "decoder_pred.")
_MAE_DECODER_EXACT = ("decoder_pos_embed", "mask_token")
_HEAD = ("head.",)
_DISTILLED = ("dist_token", "head_dist.")
_TECHNIQUE = {"mae": "mae", "deit": "supervised-deit", "timm": "unknown", "mmpretrain": "unknown"}

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


def _from_mmpretrain(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Keep ``backbone.*`` under timm names; return it and the names of everything else (neck, head)."""
    out, dropped = {}, []
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
    return out, dropped


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_file(src: Path) -> object:
    """Read a checkpoint without running any pickled code."""
    if src.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

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
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise MimbenchError(
            f"{src} was refused for safety: loading it needs arbitrary unpickling, which can run code "
            f"(torch.load with weights_only=True says: {str(e).splitlines()[0] if str(e) else 'unsupported object'}).",
            "If you trust the file, re-save its weights only in a Python session that can load it: "
            "sd = torch.load(SRC, weights_only=False); sd = sd.get('model', sd); "
            "torch.save({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, 'weights.pth'), "
            "then convert weights.pth.") from None
    except Exception as e:  # zip/format errors from torch.load
        raise MimbenchError(f"{src} cannot be read as a PyTorch checkpoint ({e}).",
                            "The file is corrupt, truncated or not a checkpoint.") from None


def _state_dict(obj: object, src: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Unwrap ``{"model": ...}`` / ``{"state_dict": ...}`` containers and a DDP ``module.`` prefix."""
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
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise MimbenchError(f"{src}: entry {k!r} of the state dict is a {type(v).__name__}, not a tensor.",
                                "Give a checkpoint whose weights are a flat dict of tensors.")
        sd[k] = v
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, wrapper


def _summarize(names: list[str]) -> str:
    """``decoder_blocks(96),head(2)``: dropped tensors grouped by top-level module."""
    counts: dict[str, int] = {}
    for k in names:
        top = k.split(".")[0]
        counts[top] = counts.get(top, 0) + 1
    return ",".join(f"{k}({n})" for k, n in sorted(counts.items()))


def _detect_layout(sd: dict[str, torch.Tensor]) -> str:
    if any(k.startswith(("backbone.layers.", "backbone.patch_embed.projection.")) for k in sd):
        return "mmpretrain"
    if any(k.startswith(_MAE_DECODER) or k in _MAE_DECODER_EXACT for k in sd):
        return "mae"
    if any(k.startswith(_DISTILLED) for k in sd):
        return "deit"
    return "timm"


def _drop(sd: dict[str, torch.Tensor], layout: str, src: Path) -> list[str]:
    """Remove tensors that are not part of the encoder; return their names."""
    if any(k.startswith(_DISTILLED) for k in sd):
        raise MimbenchError(
            f"{src} is a distilled DeiT checkpoint (it has a distillation token: "
            f"{', '.join(sorted(k for k in sd if k.startswith(_DISTILLED))[:3])}).",
            "Only single-class-token ViTs fit the encoder format; use the non-distilled DeiT weights.")
    drop = [k for k in sd if k.startswith(_HEAD)]
    if layout == "mae":
        drop += [k for k in sd if k.startswith(_MAE_DECODER) or k in _MAE_DECODER_EXACT]
    if any(k.startswith("fc_norm.") for k in sd):
        if "norm.weight" not in sd:
            raise MimbenchError(
                f"{src} was fine-tuned with global average pooling: it has fc_norm (a norm of the pooled feature) "
                "and no per-token final norm, so it cannot be stored as a token-level encoder.",
                "Convert the pre-training checkpoint of that model instead (e.g. MAE's mae_pretrain_vit_*.pth).")
        drop += [k for k in sd if k.startswith("fc_norm.")]
    for k in drop:
        del sd[k]
    return sorted(drop)


def _infer_arch(sd: dict[str, torch.Tensor], src: Path, num_heads: int | None) -> dict:
    w = sd.get("patch_embed.proj.weight")
    pos = sd.get("pos_embed")
    if w is None or w.ndim != 4 or pos is None or pos.ndim != 3 or "cls_token" not in sd:
        absent = [k for k in ("patch_embed.proj.weight", "pos_embed", "cls_token") if k not in sd]
        raise MimbenchError(
            f"{src} does not look like a ViT with a class token and absolute position embeddings "
            f"(absent: {', '.join(absent) or 'none, but shapes are unusual'}; first keys: {', '.join(list(sd)[:6])}).",
            "Supported: official MAE, DeiT (non-distilled), timm VisionTransformer and mmpretrain ViT checkpoints.")
    embed_dim, patch = int(w.shape[0]), int(w.shape[2])
    if w.shape[2] != w.shape[3]:
        raise MimbenchError(f"{src}: non-square patches {tuple(w.shape[2:])} are not supported.", "")
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    n_pos = int(pos.shape[1])
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        hint = (" It looks like position embeddings without a class position (timm no_embed_class)."
                if math.isqrt(n_pos) ** 2 == n_pos else "")
        raise MimbenchError(f"{src}: pos_embed has {n_pos} positions, not 1 + a square patch grid.{hint}",
                            "Only square grids with the class position included are supported.")
    if depth == 0 or "blocks.0.mlp.fc1.weight" not in sd:
        raise MimbenchError(f"{src}: no transformer blocks found (blocks.<i>.*).", "Is this a ViT checkpoint?")
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
    return dict(img_size=grid * patch, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=heads,
                mlp_ratio=mlp_ratio)


def convert_checkpoint(src, dst, layout: str = "auto", *, num_heads: int | None = None,
                       technique: str | None = None, epochs: float | None = None, data: str = "") -> Path:
    """Convert a foreign ViT checkpoint ``src`` into the encoder file ``dst``.

    Args:
        layout: "auto" (decoder keys -> mae, distillation token -> deit, else timm), "mae", "timm" or "deit".
        num_heads: attention heads, needed only for non-standard widths (standard sizes use
            :data:`mimbench.encoders.STANDARD_VITS`, otherwise 64-dim heads).
        technique / epochs / data: provenance for the metadata. Defaults: technique from the layout;
            epochs from the checkpoint's ``epoch`` field (+1, it counts from 0) when present, else 0 (unknown).

    The output records ``source`` (file name), ``source_sha256``, ``source_layout`` and
    ``source_dropped``; its tensors are then checked exactly like any encoder file.
    """
    src, dst = Path(src), Path(dst)
    if layout not in LAYOUTS:
        raise MimbenchError(f"Unknown checkpoint layout {layout!r}.", f"Use one of: {', '.join(LAYOUTS)}.")
    if not src.is_file():
        raise MimbenchError(f"Checkpoint {src} does not exist or is not a file.", "Check the path.")
    sd, wrapper = _state_dict(_load_file(src), src)
    if layout == "auto":
        layout = _detect_layout(sd)
    dropped = []
    if layout == "mmpretrain":
        sd, dropped = _from_mmpretrain(sd)
    dropped = sorted(dropped + _drop(sd, layout, src))
    arch = _infer_arch(sd, src, num_heads)
    if epochs is None:
        epoch = wrapper.get("epoch")
        epochs = float(epoch) + 1 if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) else 0.0
    extra = {"source_sha256": _sha256(src), "source_layout": layout, "source_dropped": _summarize(dropped)}
    return save_encoder(
        sd, dst, arch=arch_name(arch["embed_dim"], arch["depth"], arch["patch_size"]),
        technique=technique or _TECHNIQUE[layout], epochs=epochs, data=data, source=src.name, extra=extra, **arch)
