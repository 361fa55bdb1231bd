"""Encoders as timm models: reading an encoder file or a foreign checkpoint, building its family's model,
moving its position information to the requested input size and loading the weights strictly.

Checkpoints in a foreign layout (official MAE, BEiT, DINO, ... see :mod:`mimbench.encoders.convert`)
are accepted wherever an encoder file is: they are converted in memory with the same code as
``mimbench convert``, so their metadata carries ``source_layout``, ``source_sha256`` and
``source_dropped`` exactly as a converted file would. ``layout`` (``--from`` on the command line)
names the checkpoint's layout; "auto" detects it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mimbench.encoders.arch import norm_eps, parse_arch
from mimbench.encoders.convert import check_layout, convert_in_memory
from mimbench.encoders.families import Family, family_flags
from mimbench.encoders.file import (
    REQUIRED_METADATA, check_encoder_file, count_parameters, encoder_sha256, is_encoder_file, name_list,
    read_encoder_file, read_file_metadata,
)
from mimbench.errors import MimbenchError

#: Architecture arguments fixed by the file; passing them to load_encoder is an error.
ARCH_KWARGS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "in_chans", "class_token",
               "qkv_bias", "norm_layer", "no_embed_class", "reg_tokens", "init_values", "pre_norm", "pos_embed",
               "final_norm", "block_fn", "mlp_layer", "attn_layer", "qk_norm", "use_abs_pos_emb",
               "use_rel_pos_bias", "use_shared_rel_pos_bias", "swiglu_mlp", "scale_mlp", "qkv_fused",
               "swiglu_align_to", "scale_attn_inner", "num_reg_tokens", "use_rot_pos_emb", "rope_type",
               "rope_temperature", "rope_rotate_half", "rope_grid_offset", "ref_feat_shape")
#: Parameters a model may have beyond the encoder's: a pooled-feature norm and a classifier head start fresh.
FRESH_KEYS = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}


def _is_own_file(path: Path, layout: str) -> bool:
    """Whether ``path`` is an encoder file; a checkpoint layout other than "auto" is an error for one."""
    check_layout(layout)
    if not is_encoder_file(path):
        return False
    if layout != "auto":
        raise MimbenchError(f"{path} is already a mimbench encoder file; a checkpoint layout ({layout}) "
                            "does not apply to it.", "Leave out --from / layout for encoder files.")
    return True


def open_encoder(path, layout: str = "auto") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of an encoder file or of a checkpoint in a supported layout.

    Encoder files are read as they are. Anything else goes through the conversion of
    ``mimbench convert`` in memory (``layout``: one of ``mimbench.encoders.convert.LAYOUTS``;
    "auto" detects it). Tensors are checked against the metadata either way; a checkpoint that
    cannot be converted completely is an error, never a partial encoder.
    """
    path = check_encoder_file(path)
    if _is_own_file(path, layout):
        return read_encoder_file(path)
    return convert_in_memory(path, layout)


def read_metadata(path, layout: str = "auto") -> dict[str, str]:
    """The string metadata of an encoder file (checked), or of a checkpoint as converted in memory."""
    path = check_encoder_file(path)
    if _is_own_file(path, layout):
        return read_file_metadata(path)
    return open_encoder(path, layout)[1]


def _model_kwargs(family: Family, flags: dict, arch: dict, img_size, timm_kwargs: dict) -> dict:
    """The timm options of the model: the encoder's pooling default (:meth:`Family.default_pool`), no head, then
    ``timm_kwargs`` (checked).

    A default "avg" pooling (an encoder without class token) keeps the per-token final norm (``fc_norm=False``):
    its features are the mean of the normed patch tokens, as its authors evaluate it. An Eva file whose final
    norm acts on pooled features (``final_norm=pooled``, EVA-02 as timm ships it) keeps that ``fc_norm``."""
    bad = sorted(set(timm_kwargs) & set(ARCH_KWARGS))
    if bad:
        raise MimbenchError(f"load_encoder: {', '.join(bad)} is fixed by the encoder file and cannot be overridden.",
                            "Only pooling, head, dropout/drop-path and image-size options can be changed.")
    sizes = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size or ())
    if any(int(s) % arch["patch_size"] for s in sizes):
        raise MimbenchError(f"load_encoder: img_size {img_size} is not a multiple of the patch size "
                            f"{arch['patch_size']}.", "Choose an input resolution made of whole patches.")
    pool = family.default_pool(flags)
    defaults = dict(num_classes=0, global_pool=pool)
    if pool == "avg" and "global_pool" not in timm_kwargs:
        defaults["fc_norm"] = False
    return defaults | dict(timm_kwargs)


def _build(family: Family, flags: dict, arch: dict, *, img_size, in_chans: int, eps: float, kwargs: dict,
           timm_kwargs: dict) -> torch.nn.Module:
    try:
        return family.build(arch, flags, img_size=img_size, in_chans=in_chans, norm_eps=eps, **kwargs)
    except (TypeError, AssertionError, ValueError) as e:
        raise MimbenchError(f"load_encoder: timm rejected the options {timm_kwargs}: {e}.",
                            f"Check the option names against timm's {family.timm_class.__name__}.") from None


def _load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, timm_kwargs: dict) -> None:
    """Strict load, except for the fresh pooled norm / head; a pooled model has no per-token final norm."""
    if isinstance(model.norm, torch.nn.Identity):
        # pooled + fc_norm: timm drops the per-token final norm (see load_encoder)
        state = {k: v for k, v in state.items() if k not in ("norm.weight", "norm.bias")}
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - FRESH_KEYS
    if missing or result.unexpected_keys:
        raise MimbenchError(
            f"{path}: the encoder does not fit the requested model (missing: {name_list(missing) or '-'}; "
            f"unexpected: {name_list(result.unexpected_keys) or '-'}).",
            f"Options given: {timm_kwargs}. Options that add parameters (attention pooling, registers, ...) "
            "are not supported for encoder files.")


def load_encoder(path, img_size=None, *, layout: str = "auto", **timm_kwargs):
    """Build the timm model of an encoder (its family's class, e.g. ``VisionTransformer`` or ``Beit``) and load
    its weights strictly.

    Args:
        path: encoder file, or a checkpoint in a supported layout (converted in memory, see
            :func:`open_encoder`; ``layout`` names it, "auto" detects it).
        img_size: input resolution (int or (H, W)); when it differs from the stored one the
            position information is resampled with :mod:`mimbench.encoders.resample`: absolute
            position embeddings bicubically (align_corners=False, no anti-aliasing, class position
            kept), as the official MAE fine-tuning and mmsegmentation do; BEiT relative-position
            tables as BEiT and mmsegmentation do.
        **timm_kwargs: passed to the timm model (e.g. ``global_pool="avg"``, ``fc_norm=True``,
            ``drop_path_rate=0.1``, ``num_classes=1000``). Defaults: ``num_classes=0`` (head = Identity),
            the encoder's ``global_pool`` (the metadata field, else the family's: ``"token"``; Eva files with
            a pooled final norm, EVA-02 as timm ships it: ``"avg"``). Architecture arguments come from the file and
            cannot be given. For BEiT encoders ``fc_norm`` means Beit's ``use_fc_norm`` and
            ``use_mean_pooling=True`` means ``global_pool="avg"``.

    With a pooled head and ``fc_norm`` (timm enables it for ``global_pool="avg"``), timm has no
    per-token final norm: the file's ``norm.*`` is not used and ``fc_norm`` starts fresh
    (weight 1, bias 0), as in the official MAE and BEiT fine-tuning. A classifier head
    (num_classes > 0) also starts fresh; no other tensor may be missing.

    Returns the model in eval mode; ``model.mimbench_metadata`` holds the encoder's metadata.
    """
    path = Path(path)
    state, meta = open_encoder(path, layout)
    arch = parse_arch(meta, where=str(path))
    family, flags = family_flags(meta, str(path))
    kwargs = _model_kwargs(family, flags, arch, img_size, timm_kwargs)
    size = arch["img_size"] if img_size is None else img_size
    model = _build(family, flags, arch, img_size=size, in_chans=int(state["patch_embed.proj.weight"].shape[1]),
                   eps=norm_eps(meta, str(path)), kwargs=kwargs, timm_kwargs=timm_kwargs)
    grid = tuple(model.patch_embed.grid_size)
    stored = int(arch["img_size"] // arch["patch_size"])
    if grid != (stored, stored):
        state = family.resample(state, stored, grid, flags=flags)
    _load_weights(model, state, path, timm_kwargs)
    model.mimbench_metadata = meta
    return model.eval()


def describe_encoder(path, layout: str = "auto") -> str:
    """Human-readable summary for ``mimbench info``: metadata, parameter count, file SHA-256 prefix."""
    path = check_encoder_file(path)
    own = _is_own_file(path, layout)
    if own:  # count from the header: an encoder file's tensors need not be read
        meta, n_params = read_file_metadata(path), count_parameters(path)
    else:
        state, meta = open_encoder(path, layout)
        n_params = sum(v.numel() for v in state.values())
    order = [k for k in REQUIRED_METADATA if k != "format" and k in meta] + sorted(
        k for k in meta if k not in REQUIRED_METADATA)
    width = max(len(k) for k in order + ["parameters"])
    lines = [f"{path}  ({meta['format']}{'' if own else ', read in memory from a checkpoint'})"]
    lines += [f"  {k:<{width}}  {meta[k] if meta[k] != '' else '-'}" for k in order]
    lines.append(f"  {'parameters':<{width}}  {n_params / 1e6:.2f} M ({n_params:,})")
    lines.append(f"  {'sha256':<{width}}  {encoder_sha256(path)[:16]}")
    return "\n".join(lines)
