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

A second family, ``family=beit`` (timm ``Beit``: relative position bias, layer scale, q/v
biases), is described in :mod:`mimbench.encoders.beit`; files without a ``family`` field are
ViTs. Files store LayerNorm eps 1e-6 unless their ``norm_eps`` field says otherwise.

Checkpoints in a foreign layout (official MAE, BEiT, DINO, ... see
:mod:`mimbench.encoders.convert`) are accepted wherever an encoder file is: :func:`open_encoder`
converts them in memory with the same code as ``mimbench convert``, so their metadata carries
``source_layout``, ``source_sha256`` and ``source_dropped`` exactly as a converted file would.
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
    _compare_shapes(shapes_found, want, arch, where, "timm VisionTransformer")


#: Encoder families: timm ``VisionTransformer`` ("vit") and timm ``Beit`` ("beit").
FAMILIES = ("vit", "beit")


def encoder_family(meta: Mapping[str, str]) -> str:
    """The ``family`` field of an encoder's metadata ("vit" when absent, as in files older than the field)."""
    return meta.get("family", "vit")


def norm_eps(meta: Mapping[str, str], where: str = "encoder file") -> float:
    """LayerNorm epsilon of the encoder: the ``norm_eps`` field, 1e-6 when absent."""
    try:
        return float(meta.get("norm_eps", "1e-06"))
    except ValueError:
        raise MimbenchError(f"{where}: metadata field 'norm_eps' is {meta.get('norm_eps')!r}, not a number.",
                            "Re-export or re-convert the encoder.") from None


def check_tensors(shapes_found: Mapping[str, tuple[int, ...]], meta: Mapping[str, str], arch: Mapping[str, float],
                  where: str) -> None:
    """:func:`check_state_dict` for the encoder's family (ViT or BEiT)."""
    family = encoder_family(meta)
    if family == "vit":
        return check_state_dict(shapes_found, arch, where)
    if family != "beit":
        raise MimbenchError(f"{where}: unknown encoder family {family!r}.",
                            f"This version of mimbench reads {', '.join(FAMILIES)}; update mimbench or re-export.")
    from mimbench.encoders.beit import beit_expected_shapes, parse_beit_flags

    flags = parse_beit_flags(meta, where)
    w = shapes_found.get("patch_embed.proj.weight")
    in_chans = int(w[1]) if w is not None and len(w) == 4 else 3
    want = beit_expected_shapes(img_size=int(arch["img_size"]), patch_size=int(arch["patch_size"]),
                                embed_dim=int(arch["embed_dim"]), depth=int(arch["depth"]),
                                num_heads=int(arch["num_heads"]),
                                mlp_hidden=mlp_hidden(int(arch["embed_dim"]), float(arch["mlp_ratio"])),
                                flags=flags, in_chans=in_chans)
    _compare_shapes(shapes_found, want, arch, where, "timm Beit")


def _compare_shapes(shapes_found, want, arch, where, what):
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
            f"{arch_name(int(arch['embed_dim']), int(arch['depth']), int(arch['patch_size']))} {what} encoder "
            f"({'; '.join(parts)}).",
            "An encoder file holds exactly the encoder's tensors (no head, no decoder); foreign checkpoints are "
            "converted by `mimbench convert` or read directly by load_encoder/--encoder.")
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


def encoder_metadata(*, arch: str, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                     technique: str, config_sha256: str = "", epochs: float = 0, data: str = "",
                     source: str = "mimbench", mlp_ratio: float = 4.0, family: str = "vit",
                     extra: Mapping[str, str] | None = None, where: str = "encoder") -> dict[str, str]:
    """The string metadata of an encoder file (what :func:`save_encoder` writes), checked."""
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
    if family not in FAMILIES:
        raise MimbenchError(f"save_encoder: unknown encoder family {family!r}.", f"Use one of {', '.join(FAMILIES)}.")
    if family != "vit":
        meta["family"] = family
    elif meta.get("family", "vit") != "vit":
        raise MimbenchError("save_encoder: extra metadata 'family' contradicts family='vit'.",
                            "Pass family= as its own argument.")
    parse_arch(meta, where=where)
    if family == "beit":
        from mimbench.encoders.beit import parse_beit_flags

        parse_beit_flags(meta, where)
    norm_eps(meta, where)
    return meta


def save_encoder(state_dict: Mapping[str, torch.Tensor], path, *, arch: str, img_size: int, patch_size: int,
                 embed_dim: int, depth: int, num_heads: int, technique: str, config_sha256: str = "",
                 epochs: float = 0, data: str = "", source: str = "mimbench", mlp_ratio: float = 4.0,
                 family: str = "vit", extra: Mapping[str, str] | None = None) -> Path:
    """Write an encoder file atomically (temporary file in the same folder, fsync, rename).

    ``state_dict`` must hold exactly the tensors of the described architecture in timm's
    VisionTransformer layout (see the module docstring); anything else raises MimbenchError
    before a byte is written. ``epochs`` = pre-training epochs (0 = unknown). ``extra`` adds
    string metadata (e.g. ``source_sha256``, ``source_layout``); it may not override the
    standard fields. ``family="beit"`` stores a timm ``Beit`` state dict; ``extra`` must then hold
    the fields of :data:`mimbench.encoders.beit.BEIT_FIELDS`. An existing file at ``path`` is
    replaced only once the new one is complete.
    """
    path = Path(path)
    meta = encoder_metadata(arch=arch, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                            num_heads=num_heads, technique=technique, config_sha256=config_sha256, epochs=epochs,
                            data=data, source=source, mlp_ratio=mlp_ratio, family=family, extra=extra,
                            where=f"encoder for {path}")
    parsed = parse_arch(meta, where=f"encoder for {path}")
    tensors = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise MimbenchError(f"save_encoder: state_dict[{k!r}] is a {type(v).__name__}, not a tensor.",
                                "Pass the encoder's state_dict() only.")
        # clone: safetensors refuses tensors that share storage (e.g. views of one buffer)
        tensors[k] = v.detach().to("cpu").contiguous().clone()
    check_tensors({k: tuple(v.shape) for k, v in tensors.items()}, meta, parsed, f"encoder for {path}")

    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), what="the encoder file",
                        fix="Choose an output folder you can write to, with free disk space.")


def check_encoder_file(path) -> Path:
    """``path`` as a Path if it names an existing file, else MimbenchError saying what to pass."""
    path = Path(path)
    if not path.exists():
        raise MimbenchError(f"Encoder file {path} does not exist.",
                            "Check the path; encoders are written by `mimbench pretrain` or `mimbench convert`, "
                            "checkpoints of the supported layouts (docs/checkpoints.md) are read as they are.")
    if not path.is_file():
        raise MimbenchError(f"Encoder path {path} is not a file.", "Give the encoder or checkpoint file itself.")
    return path


def _open(path: Path):
    from safetensors import safe_open

    check_encoder_file(path)
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error type (and OSError) for bad headers / truncation
        raise MimbenchError(
            f"{path} is not a readable safetensors file ({e}).",
            "The file is corrupt or truncated: re-export or re-download it.") from None


def is_encoder_file(path) -> bool:
    """True for a mimbench encoder file (safetensors with the mimbench format tag), False for a checkpoint.

    A ``.safetensors`` file that cannot be read raises MimbenchError; one whose tag names another
    version of the encoder format too (it is not a foreign checkpoint either).
    """
    path = check_encoder_file(path)
    if path.suffix != ".safetensors":
        return False
    with _open(path) as f:
        tag = (f.metadata() or {}).get("format", "")
    if tag == FORMAT_TAG:
        return True
    if tag.startswith("mimbench-encoder/"):
        raise MimbenchError(f"{path} is a mimbench encoder file of format {tag!r}; this version reads {FORMAT_TAG!r}.",
                            "Update mimbench, or re-export the encoder with this version.")
    return False


def _read_own_metadata(path: Path) -> dict[str, str]:
    with _open(path) as f:
        meta = dict(f.metadata() or {})
    absent = [k for k in REQUIRED_METADATA if k not in meta]
    if absent:
        raise MimbenchError(f"{path}: metadata lacks {', '.join(absent)}.", "Re-export or re-convert the encoder.")
    parse_arch(meta, where=str(path))
    if encoder_family(meta) == "beit":
        from mimbench.encoders.beit import parse_beit_flags

        parse_beit_flags(meta, str(path))
    norm_eps(meta, str(path))
    return meta


#: Layout forced for a checkpoint path (``--from``), see :func:`declare_layout`.
_DECLARED_LAYOUTS: dict[str, str] = {}


def declare_layout(path, layout: str) -> None:
    """Read the checkpoint at ``path`` as ``layout`` (a :data:`mimbench.encoders.convert.LAYOUTS` name) from now on.

    This is what ``--from`` does: every later :func:`open_encoder` / :func:`load_encoder` /
    :func:`read_metadata` of that path in this process converts it with the given layout
    instead of detecting one ("auto" undoes it).
    """
    from mimbench.encoders.convert import LAYOUTS

    if layout not in LAYOUTS:
        raise MimbenchError(f"Unknown checkpoint layout {layout!r}.", f"Use one of: {', '.join(LAYOUTS)}.")
    key = str(Path(path).resolve())
    if layout == "auto":
        _DECLARED_LAYOUTS.pop(key, None)
    else:
        _DECLARED_LAYOUTS[key] = layout


def declared_layout(path) -> str:
    """The layout declared for ``path`` with :func:`declare_layout`, else "auto"."""
    return _DECLARED_LAYOUTS.get(str(Path(path).resolve()), "auto")


def open_encoder(path, layout: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of an encoder file or of a checkpoint in a supported layout.

    Encoder files are read as they are. Anything else goes through the conversion of
    ``mimbench convert`` in memory (``layout``: one of ``mimbench.encoders.convert.LAYOUTS``;
    default: the one declared for the path, else detected). Tensors are checked against the
    metadata either way; a checkpoint that cannot be converted completely is an error, never a
    partial encoder.
    """
    path = check_encoder_file(path)
    if is_encoder_file(path):
        if layout not in (None, "auto"):
            raise MimbenchError(f"{path} is already a mimbench encoder file; a checkpoint layout ({layout}) "
                                "does not apply to it.", "Leave out --from / layout for encoder files.")
        from safetensors.torch import load_file

        meta = _read_own_metadata(path)
        try:
            state = load_file(str(path))
        except Exception as e:
            raise MimbenchError(f"{path}: tensors cannot be read ({e}).", "The file is corrupt; re-export it.") from None
        check_tensors({k: tuple(v.shape) for k, v in state.items()}, meta, parse_arch(meta, str(path)), str(path))
        return state, meta
    from mimbench.encoders.convert import convert_in_memory

    return convert_in_memory(path, layout or declared_layout(path))


def read_metadata(path) -> dict[str, str]:
    """The string metadata of an encoder file (checked), or of a checkpoint as converted in memory."""
    path = check_encoder_file(path)
    if is_encoder_file(path):
        return _read_own_metadata(path)
    return open_encoder(path)[1]


def encoder_sha256(path) -> str:
    """Hex SHA-256 of the file's bytes (read in 1 MiB chunks): the encoder file, or the checkpoint as given."""
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
                "final_norm", "block_fn", "mlp_layer", "attn_layer", "qk_norm", "use_abs_pos_emb",
                "use_rel_pos_bias", "use_shared_rel_pos_bias", "swiglu_mlp", "scale_mlp")


def load_encoder(path, img_size=None, *, layout: str | None = None, **timm_kwargs):
    """Build the timm model of an encoder (``VisionTransformer`` or ``Beit``) and load its weights strictly.

    Args:
        path: encoder file, or a checkpoint in a supported layout (converted in memory, see
            :func:`open_encoder`; ``layout`` forces one).
        img_size: input resolution (int or (H, W)); when it differs from the stored one the
            position information is resampled with :mod:`mimbench.encoders.resample`: absolute
            position embeddings bicubically (align_corners=False, no anti-aliasing, class position
            kept), as the official MAE fine-tuning and mmsegmentation do; BEiT relative-position
            tables as BEiT and mmsegmentation do.
        **timm_kwargs: passed to the timm model (e.g. ``global_pool="avg"``, ``fc_norm=True``,
            ``drop_path_rate=0.1``, ``num_classes=1000``). Defaults: ``num_classes=0`` (head = Identity),
            ``global_pool="token"``. Architecture arguments come from the file and cannot be given.
            For BEiT encoders ``fc_norm`` means Beit's ``use_fc_norm`` and ``use_mean_pooling=True``
            means ``global_pool="avg"``.

    With a pooled head and ``fc_norm`` (timm enables it for ``global_pool="avg"``), timm has no
    per-token final norm: the file's ``norm.*`` is not used and ``fc_norm`` starts fresh
    (weight 1, bias 0), as in the official MAE and BEiT fine-tuning. A classifier head
    (num_classes > 0) also starts fresh; no other tensor may be missing.

    Returns the model in eval mode; ``model.mimbench_metadata`` holds the encoder's metadata.
    """
    import timm.models.vision_transformer as tvit

    from mimbench.encoders.resample import resample_pos_embed

    path = Path(path)
    state, meta = open_encoder(path, layout)
    state = dict(state)
    arch = parse_arch(meta, where=str(path))
    family = encoder_family(meta)
    bad = sorted(set(timm_kwargs) & set(_ARCH_KWARGS))
    if bad:
        raise MimbenchError(f"load_encoder: {', '.join(bad)} is fixed by the encoder file and cannot be overridden.",
                            "Only pooling, head, dropout/drop-path and image-size options can be changed.")
    sizes = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size or ())
    if any(int(s) % arch["patch_size"] for s in sizes):
        raise MimbenchError(f"load_encoder: img_size {img_size} is not a multiple of the patch size "
                            f"{arch['patch_size']}.",
                            "Choose an input resolution made of whole patches.")
    in_chans = int(state["patch_embed.proj.weight"].shape[1])
    kwargs = dict(num_classes=0, global_pool="token")
    kwargs.update(timm_kwargs)
    size = arch["img_size"] if img_size is None else img_size
    eps = norm_eps(meta, str(path))
    try:
        if family == "beit":
            from mimbench.encoders.beit import build_beit, parse_beit_flags

            model = build_beit(img_size=size, patch_size=arch["patch_size"], in_chans=in_chans,
                               embed_dim=arch["embed_dim"], depth=arch["depth"], num_heads=arch["num_heads"],
                               mlp_ratio=arch["mlp_ratio"], flags=parse_beit_flags(meta, str(path)), norm_eps=eps,
                               **kwargs)
        else:
            model = tvit.VisionTransformer(
                img_size=size, patch_size=arch["patch_size"], in_chans=in_chans, embed_dim=arch["embed_dim"],
                depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"], qkv_bias=True,
                class_token=True, norm_layer=partial(torch.nn.LayerNorm, eps=eps), **kwargs)
    except (TypeError, AssertionError, ValueError) as e:
        raise MimbenchError(f"load_encoder: timm rejected the options {timm_kwargs}: {e}.",
                            "Check the option names against timm's VisionTransformer / Beit.") from None

    grid = tuple(model.patch_embed.grid_size)
    stored = int(arch["img_size"] // arch["patch_size"])
    if grid != (stored, stored):
        if family == "beit":
            from mimbench.encoders.beit import resample_beit_state

            state = resample_beit_state(state, stored, grid)
        else:
            state["pos_embed"] = resample_pos_embed(state["pos_embed"], grid, (stored, stored))
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
    own = is_encoder_file(path)
    if own:  # count from the header: an encoder file's tensors need not be read
        meta = _read_own_metadata(path)
        with _open(path) as f:
            n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    else:
        state, meta = open_encoder(path)
        n_params = sum(v.numel() for v in state.values())
    sha = encoder_sha256(path)
    order = [k for k in REQUIRED_METADATA if k != "format" and k in meta] + sorted(
        k for k in meta if k not in REQUIRED_METADATA)
    width = max(len(k) for k in order + ["parameters"])
    lines = [f"{path}  ({meta['format']}{'' if own else ', read in memory from a checkpoint'})"]
    lines += [f"  {k:<{width}}  {meta[k] if meta[k] != '' else '-'}" for k in order]
    lines.append(f"  {'parameters':<{width}}  {n_params / 1e6:.2f} M ({n_params:,})")
    lines.append(f"  {'sha256':<{width}}  {sha[:16]}")
    return "\n".join(lines)
