"""The encoder file: the single point where pre-training hands a ViT to the evaluations.

An encoder file is a safetensors file whose tensors are the state dict of the encoder's timm model
without classifier head, and whose string metadata describes the architecture and the provenance
(:data:`REQUIRED_METADATA`). The ``family`` field names the timm model class and its state-dict
layout (:mod:`mimbench.encoders.families`; absent = ``vit``, timm ``VisionTransformer``, laid out in
:mod:`mimbench.encoders.vit`; ``beit``, timm ``Beit``, in :mod:`mimbench.encoders.beit`). Files store
LayerNorm eps 1e-6 unless their ``norm_eps`` field says otherwise.

This module writes, reads and checks such files; :mod:`mimbench.encoders.load` turns them (or
checkpoints in a foreign layout, :mod:`mimbench.encoders.convert`) into models.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Mapping

import safetensors.torch
import torch
from safetensors import safe_open

from mimbench import __version__
from mimbench.atomic import atomic_write
from mimbench.encoders.arch import arch_name, norm_eps, parse_arch
from mimbench.encoders.families import FAMILIES, family_flags
from mimbench.env import git_commit
from mimbench.errors import MimbenchError

FORMAT_TAG = "mimbench-encoder/1"
#: A Hugging Face model folder (``save_pretrained``): its config and, in order of preference, its weights file.
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

#: Metadata every encoder file carries (all values are strings, as safetensors requires).
REQUIRED_METADATA = (
    "format", "arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio",
    "technique", "config_sha256", "epochs", "data", "code_version", "source",
)


def name_list(names, limit: int = 8) -> str:
    """``a, b, c ... (12 in all)``: sorted names, the first ``limit`` shown."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def check_tensors(shapes_found: Mapping[str, tuple[int, ...]], meta: Mapping[str, str], arch: Mapping[str, float],
                  where: str) -> None:
    """Raise MimbenchError unless the tensors are exactly those the metadata describes (names missing /
    unexpected / mis-shaped), for the encoder's family."""
    family, flags = family_flags(meta, where)
    w = shapes_found.get("patch_embed.proj.weight")
    in_chans = int(w[1]) if w is not None and len(w) == 4 else 3
    want = family.shapes(arch, flags, in_chans)
    what = f"{arch_name(int(arch['embed_dim']), int(arch['depth']), int(arch['patch_size']))} timm " \
           f"{family.timm_class.__name__}"
    missing = set(want) - set(shapes_found)
    unexpected = set(shapes_found) - set(want)
    if missing or unexpected:
        parts = [f"missing tensors: {name_list(missing)}"] if missing else []
        parts += [f"unexpected tensors: {name_list(unexpected)}"] if unexpected else []
        raise MimbenchError(
            f"{where} does not hold the tensors of a {what} encoder ({'; '.join(parts)}).",
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


def check_metadata(meta: Mapping[str, str], where: str) -> dict[str, float]:
    """Check the architecture, family and norm fields of ``meta``; return the parsed architecture."""
    arch = parse_arch(meta, where=where)
    family_flags(meta, where)
    norm_eps(meta, where)
    return arch


def code_version() -> str:
    """mimbench version, plus the git commit of the checkout when running from one (e.g. ``0.1.0+g1a2b3c4``)."""
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
    check_metadata(meta, where)
    return meta


def save_encoder(state_dict: Mapping[str, torch.Tensor], path, *, arch: str, img_size: int, patch_size: int,
                 embed_dim: int, depth: int, num_heads: int, technique: str, config_sha256: str = "",
                 epochs: float = 0, data: str = "", source: str = "mimbench", mlp_ratio: float = 4.0,
                 family: str = "vit", extra: Mapping[str, str] | None = None) -> Path:
    """Write an encoder file atomically (temporary file in the same folder, fsync, rename).

    ``state_dict`` must hold exactly the tensors of the described architecture in the family's timm
    layout (:mod:`mimbench.encoders.vit`, :mod:`mimbench.encoders.beit`); anything else raises
    MimbenchError before a byte is written. ``epochs`` = pre-training epochs (0 = unknown). ``extra``
    adds string metadata (e.g. ``source_sha256``, ``source_layout``); it may not override the
    standard fields. ``family="beit"`` stores a timm ``Beit`` state dict; ``extra`` must then hold
    the fields of :data:`mimbench.encoders.beit.BEIT_FIELDS`. An existing file at ``path`` is
    replaced only once the new one is complete.
    """
    path = Path(path)
    where = f"encoder for {path}"
    meta = encoder_metadata(arch=arch, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                            num_heads=num_heads, technique=technique, config_sha256=config_sha256, epochs=epochs,
                            data=data, source=source, mlp_ratio=mlp_ratio, family=family, extra=extra, where=where)
    tensors = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise MimbenchError(f"save_encoder: state_dict[{k!r}] is a {type(v).__name__}, not a tensor.",
                                "Pass the encoder's state_dict() only.")
        # clone: safetensors refuses tensors that share storage (e.g. views of one buffer)
        tensors[k] = v.detach().to("cpu").contiguous().clone()
    check_tensors({k: tuple(v.shape) for k, v in tensors.items()}, meta, parse_arch(meta, where), where)
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=meta), what="the encoder file",
                        fix="Choose an output folder you can write to, with free disk space.")


def check_encoder_file(path) -> Path:
    """``path`` as a Path if it names an existing file or a Hugging Face model folder (a directory with
    ``config.json``), else MimbenchError saying what to pass."""
    path = Path(path)
    if path.is_dir() and (path / HF_CONFIG).is_file():
        return path
    if not path.exists():
        raise MimbenchError(f"Encoder file {path} does not exist.",
                            "Check the path; encoders are written by `mimbench pretrain` or `mimbench convert`, "
                            "checkpoints of the supported layouts (docs/checkpoints.md) are read as they are.")
    if not path.is_file():
        raise MimbenchError(f"Encoder path {path} is not a file.", "Give the encoder or checkpoint file itself, or a "
                            f"Hugging Face model folder ({HF_CONFIG} + {' or '.join(HF_WEIGHTS)}).")
    return path


def open_safetensors(path: Path):
    """``safe_open`` of an existing file; MimbenchError when its header cannot be read."""
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
    with open_safetensors(path) as f:
        tag = (f.metadata() or {}).get("format", "")
    if tag == FORMAT_TAG:
        return True
    if tag.startswith("mimbench-encoder/"):
        raise MimbenchError(f"{path} is a mimbench encoder file of format {tag!r}; this version reads {FORMAT_TAG!r}.",
                            "Update mimbench, or re-export the encoder with this version.")
    return False


def read_file_metadata(path: Path) -> dict[str, str]:
    """The checked metadata of an encoder file (header only; tensors are not read)."""
    with open_safetensors(path) as f:
        meta = dict(f.metadata() or {})
    absent = [k for k in REQUIRED_METADATA if k not in meta]
    if absent:
        raise MimbenchError(f"{path}: metadata lacks {', '.join(absent)}.", "Re-export or re-convert the encoder.")
    check_metadata(meta, str(path))
    return meta


def read_encoder_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of an encoder file, the tensors checked against the metadata."""
    meta = read_file_metadata(path)
    try:
        state = safetensors.torch.load_file(str(path))
    except Exception as e:
        raise MimbenchError(f"{path}: tensors cannot be read ({e}).", "The file is corrupt; re-export it.") from None
    check_tensors({k: tuple(v.shape) for k, v in state.items()}, meta, parse_arch(meta, str(path)), str(path))
    return state, meta


def count_parameters(path: Path) -> int:
    """Number of values in an encoder file, counted from its header (the tensors are not read)."""
    with open_safetensors(path) as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def encoder_sha256(path) -> str:
    """Hex SHA-256 of the file's bytes (read in 1 MiB chunks): the encoder file, or the checkpoint as given; for a
    Hugging Face folder, of its config.json's bytes followed by its weights file's (other files do not count)."""
    path = check_encoder_file(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else [path / HF_CONFIG] + [path / n for n in HF_WEIGHTS if (path / n).is_file()][:1]
    for name in files:
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
