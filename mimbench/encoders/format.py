"""The encoder file: the single point where pre-training hands a ViT to the evaluations.

An encoder file is a safetensors file whose tensors are the state dict of a timm
``VisionTransformer`` without classifier head, in timm's key layout::

    cls_token                      (1, 1, D)
    pos_embed                      (1, 1 + (S/p)**2, D)   class position first, then the patch grid row-major
    patch_embed.proj.weight/bias   (D, C, p, p) / (D,)
    blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2 .weight/.bias
    norm.weight/bias               (D,)                     final per-token LayerNorm (eps 1e-6)

and whose string metadata describes the architecture and the provenance (see
:data:`REQUIRED_METADATA`). The architecture is always the one of the MAE/DeiT ViTs:
pre-norm blocks, LayerNorm eps 1e-6, qkv bias, a class token, learned absolute position
embeddings that include the class position, no layer scale.
"""
from __future__ import annotations

import hashlib
import math
from functools import partial
from pathlib import Path
from typing import Mapping

import torch

from mimbench.atomic import atomic_write
from mimbench.errors import MimbenchError

FORMAT_TAG = "mimbench-encoder/1"

#: Metadata every encoder file carries (all values are strings, as safetensors requires).
REQUIRED_METADATA = (
    "format", "arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
    "technique", "config_sha256", "epochs", "data", "code_version", "source",
)
_INT_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
_FLOAT_FIELDS = ("mlp_ratio", "epochs")

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


def expected_shapes(*, img_size: int, patch_size: int, embed_dim: int, depth: int, mlp_ratio: float,
                    in_chans: int = 3) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of an encoder file with this architecture (timm VisionTransformer keys)."""
    d, h = embed_dim, mlp_hidden(embed_dim, mlp_ratio)
    grid = img_size // patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + grid * grid, d),
        "patch_embed.proj.weight": (d, in_chans, patch_size, patch_size),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    per_block = {
        "norm1.weight": (d,), "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,),
        "mlp.fc1.weight": (h, d), "mlp.fc1.bias": (h,),
        "mlp.fc2.weight": (d, h), "mlp.fc2.bias": (d,),
    }
    for i in range(depth):
        for name, shape in per_block.items():
            shapes[f"blocks.{i}.{name}"] = shape
    return shapes


def _name_list(names, limit: int = 8) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def check_state_dict(shapes_found: Mapping[str, tuple[int, ...]], arch: Mapping[str, float], where: str) -> None:
    """Raise MimbenchError unless the tensors are exactly those of ``arch`` (names missing/unexpected/mis-shaped)."""
    in_chans = 3
    w = shapes_found.get("patch_embed.proj.weight")
    if w is not None and len(w) == 4:
        in_chans = int(w[1])
    want = expected_shapes(img_size=int(arch["img_size"]), patch_size=int(arch["patch_size"]),
                           embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]),
                           mlp_ratio=float(arch["mlp_ratio"]), in_chans=in_chans)
    missing = set(want) - set(shapes_found)
    unexpected = set(shapes_found) - set(want)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_name_list(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_name_list(unexpected)}")
        raise MimbenchError(
            f"{where} does not hold the tensors of a "
            f"{arch_name(int(arch['embed_dim']), int(arch['depth']), int(arch['patch_size']))} "
            f"timm VisionTransformer encoder ({'; '.join(parts)}).",
            "An encoder file holds exactly cls_token, pos_embed, patch_embed.proj.*, blocks.<i>.* and norm.* "
            "(no head, no decoder). Foreign checkpoints must go through `mimbench convert`.")
    wrong = [f"{k}: {tuple(shapes_found[k])} (expected {want[k]})" for k in sorted(want)
             if tuple(shapes_found[k]) != want[k]]
    if wrong:
        raise MimbenchError(
            f"{where}: tensor shapes disagree with the architecture in its metadata "
            f"(img_size={arch['img_size']}, patch_size={arch['patch_size']}, embed_dim={arch['embed_dim']}, "
            f"depth={arch['depth']}, mlp_ratio={arch['mlp_ratio']}): " + "; ".join(wrong[:6])
            + (f" ... ({len(wrong)} in all)" if len(wrong) > 6 else "") + ".",
            "The file was edited or written with wrong metadata; re-export or re-convert it.")


def parse_arch(meta: Mapping[str, str], where: str = "encoder file") -> dict[str, float]:
    """Numeric architecture fields of the metadata: ints for sizes, floats for mlp_ratio/epochs."""
    out: dict[str, float] = {}
    for k in _INT_FIELDS + _FLOAT_FIELDS:
        try:
            out[k] = int(meta[k]) if k in _INT_FIELDS else float(meta[k])
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


def code_version() -> str:
    """mimbench version, plus the git commit of the checkout when running from one (e.g. ``0.1.0+g1a2b3c4``)."""
    from mimbench import __version__
    from mimbench.env import git_commit

    commit = git_commit()
    return f"{__version__}+g{commit[:12]}" if commit else __version__


def save_encoder(state_dict: Mapping[str, torch.Tensor], path, *, arch: str, img_size: int, patch_size: int,
                 embed_dim: int, depth: int, num_heads: int, technique: str, config_sha256: str = "",
                 epochs: float = 0, data: str = "", source: str = "mimbench", mlp_ratio: float = 4.0,
                 extra: Mapping[str, str] | None = None) -> Path:
    """Write an encoder file atomically (temporary file in the same folder, fsync, rename).

    ``state_dict`` must hold exactly the tensors of the described architecture in timm's
    VisionTransformer layout (see the module docstring); anything else raises MimbenchError
    before a byte is written. ``epochs`` = pre-training epochs (0 = unknown). ``extra`` adds
    string metadata (e.g. ``source_sha256``, ``source_layout``); it may not override the
    standard fields. An existing file at ``path`` is replaced only once the new one is complete.
    """
    path = Path(path)
    meta = {
        "format": FORMAT_TAG, "arch": str(arch), "img_size": str(int(img_size)), "patch_size": str(int(patch_size)),
        "embed_dim": str(int(embed_dim)), "depth": str(int(depth)), "num_heads": str(int(num_heads)),
        "mlp_ratio": repr(float(mlp_ratio)), "technique": str(technique), "config_sha256": str(config_sha256),
        "epochs": repr(float(epochs)), "data": str(data), "code_version": code_version(), "source": str(source),
    }
    for k, v in (extra or {}).items():
        if k in meta:
            raise MimbenchError(f"save_encoder: extra metadata {k!r} would override a standard field.",
                                f"Pass {k} as its own argument.")
        meta[str(k)] = str(v)
    parsed = parse_arch(meta, where=f"encoder for {path}")
    tensors = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise MimbenchError(f"save_encoder: state_dict[{k!r}] is a {type(v).__name__}, not a tensor.",
                                "Pass the encoder's state_dict() only.")
        # clone: safetensors refuses tensors that share storage (e.g. views of one buffer)
        tensors[k] = v.detach().to("cpu").contiguous().clone()
    check_state_dict({k: tuple(v.shape) for k, v in tensors.items()}, parsed, f"encoder for {path}")

    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), what="the encoder file",
                        fix="Choose an output folder you can write to, with free disk space.")


def check_encoder_file(path) -> Path:
    """``path`` as a Path if it names an existing file, else MimbenchError saying what to pass."""
    path = Path(path)
    if not path.exists():
        raise MimbenchError(f"Encoder file {path} does not exist.",
                            "Check the path; encoders are written by `mimbench pretrain` or `mimbench convert`.")
    if not path.is_file():
        raise MimbenchError(f"Encoder path {path} is not a file.", "Give the .safetensors file itself.")
    return path


def _open(path: Path):
    from safetensors import safe_open

    check_encoder_file(path)
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error type (and OSError) for bad headers / truncation
        raise MimbenchError(
            f"{path} is not a readable safetensors file ({e}).",
            "The file is corrupt or truncated (re-export or re-download it), or it is a PyTorch .pth checkpoint: "
            "convert that with `mimbench convert SRC DST.safetensors`.") from None


def read_metadata(path) -> dict[str, str]:
    """The string metadata of an encoder file, checked for the format tag and required fields."""
    path = Path(path)
    with _open(path) as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT_TAG:
        raise MimbenchError(
            f"{path} is a safetensors file but not a mimbench encoder (format tag {meta.get('format')!r}, "
            f"expected {FORMAT_TAG!r}).",
            "Convert foreign weights (timm, DeiT, official MAE) with `mimbench convert SRC DST.safetensors`.")
    absent = [k for k in REQUIRED_METADATA if k not in meta]
    if absent:
        raise MimbenchError(f"{path}: metadata lacks {', '.join(absent)}.", "Re-export or re-convert the encoder.")
    parse_arch(meta, where=str(path))
    return meta


def encoder_sha256(path) -> str:
    """Hex SHA-256 of the file's bytes (read in 1 MiB chunks)."""
    path = Path(path)
    check_encoder_file(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: Architecture arguments fixed by the file; passing them to load_encoder is an error.
_ARCH_KWARGS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "in_chans", "class_token",
                "qkv_bias", "norm_layer", "no_embed_class", "reg_tokens", "init_values", "pre_norm", "pos_embed",
                "final_norm", "block_fn", "mlp_layer", "attn_layer", "qk_norm")


def load_encoder(path, img_size=None, *, pos_embed_antialias: bool = False, **timm_kwargs):
    """Build timm's ``VisionTransformer`` from an encoder file and load its weights strictly.

    Args:
        path: encoder file.
        img_size: input resolution (int or (H, W)); when it differs from the stored one the
            position embeddings of the patch grid are resampled bicubically with timm's
            ``resample_abs_pos_embed`` (class position kept as is).
        pos_embed_antialias: False (default) gives plain bicubic interpolation with
            align_corners=False, exactly what the official MAE fine-tuning (``interpolate_pos_embed``)
            and mmsegmentation's ViT do. True is timm's own default; PyTorch's antialiased bicubic
            uses a different kernel (a=-0.5 instead of -0.75), so it differs even when up-sampling.
        **timm_kwargs: passed to ``VisionTransformer`` (e.g. ``global_pool="avg"``, ``fc_norm=True``,
            ``drop_path_rate=0.1``, ``num_classes=1000``). Defaults: ``num_classes=0`` (head = Identity),
            ``global_pool="token"``. Architecture arguments come from the file and cannot be given.

    With a pooled head and ``fc_norm`` (timm enables it for ``global_pool="avg"``), timm has no
    per-token final norm: the file's ``norm.*`` is not used and ``fc_norm`` starts fresh
    (weight 1, bias 0), as in the official MAE fine-tuning. A classifier head (num_classes > 0)
    also starts fresh; no other tensor may be missing.

    Returns the model in eval mode; ``model.mimbench_metadata`` holds the file's metadata.
    """
    import timm.models.vision_transformer as tvit
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    path = Path(path)
    meta = read_metadata(path)
    arch = parse_arch(meta, where=str(path))
    bad = sorted(set(timm_kwargs) & set(_ARCH_KWARGS))
    if bad:
        raise MimbenchError(f"load_encoder: {', '.join(bad)} is fixed by the encoder file and cannot be overridden.",
                            "Only pooling, head, dropout/drop-path and image-size options can be changed.")
    try:
        state = load_file(str(path))
    except Exception as e:
        raise MimbenchError(f"{path}: tensors cannot be read ({e}).", "The file is corrupt; re-export it.") from None
    check_state_dict({k: tuple(v.shape) for k, v in state.items()}, arch, str(path))

    sizes = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size or ())
    if any(int(s) % arch["patch_size"] for s in sizes):
        raise MimbenchError(f"load_encoder: img_size {img_size} is not a multiple of the patch size "
                            f"{arch['patch_size']}.",
                            "Choose an input resolution made of whole patches.")
    in_chans = int(state["patch_embed.proj.weight"].shape[1])
    kwargs = dict(num_classes=0, global_pool="token")
    kwargs.update(timm_kwargs)
    size = arch["img_size"] if img_size is None else img_size
    try:
        model = tvit.VisionTransformer(
            img_size=size, patch_size=arch["patch_size"], in_chans=in_chans, embed_dim=arch["embed_dim"],
            depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"], qkv_bias=True,
            class_token=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **kwargs)
    except (TypeError, AssertionError, ValueError) as e:
        raise MimbenchError(f"load_encoder: timm rejected the options {timm_kwargs}: {e}.",
                            "Check the option names against timm's VisionTransformer.") from None

    grid = list(model.patch_embed.grid_size)
    stored = arch["img_size"] // arch["patch_size"]
    if grid != [stored, stored]:
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=grid, old_size=[stored, stored],
                                                    num_prefix_tokens=1, interpolation="bicubic",
                                                    antialias=pos_embed_antialias)
    if isinstance(model.norm, torch.nn.Identity):
        # pooled + fc_norm: timm drops the per-token final norm (see docstring)
        state.pop("norm.weight")
        state.pop("norm.bias")
    result = model.load_state_dict(state, strict=False)
    allowed = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    missing = set(result.missing_keys) - allowed
    if missing or result.unexpected_keys:
        raise MimbenchError(
            f"{path}: the encoder does not fit the requested model (missing: {_name_list(missing) or '-'}; "
            f"unexpected: {_name_list(result.unexpected_keys) or '-'}).",
            f"Options given: {timm_kwargs}. Options that add parameters (attention pooling, registers, ...) "
            "are not supported for encoder files.")
    model.mimbench_metadata = meta
    return model.eval()


def describe_encoder(path) -> str:
    """Human-readable summary for ``mimbench info``: metadata, parameter count, file SHA-256 prefix."""
    path = Path(path)
    meta = read_metadata(path)
    with _open(path) as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    sha = encoder_sha256(path)
    order = [k for k in REQUIRED_METADATA if k != "format"] + sorted(k for k in meta if k not in REQUIRED_METADATA)
    width = max(len(k) for k in order + ["parameters"])
    lines = [f"{path}  ({meta['format']})"]
    lines += [f"  {k:<{width}}  {meta[k] if meta[k] != '' else '-'}" for k in order]
    lines.append(f"  {'parameters':<{width}}  {n_params / 1e6:.2f} M ({n_params:,})")
    lines.append(f"  {'sha256':<{width}}  {sha[:16]}")
    return "\n".join(lines)
