"""``mimbench export``: an encoder (file, checkpoint or Hugging Face folder) in another library's format.

* ``hf`` -- a folder ``transformers.AutoModel.from_pretrained(DIR)`` loads with the encoder's features:
  the ViT family as ``ViTModel`` (plain), ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (layer scale and/or
  register tokens) or ``IJepaModel`` (no class token), the BEiT family as ``BeitModel``, a DINOv3-style Eva
  encoder as ``DINOv3ViTModel`` (an EVA-02-style one has no transformers class: refused, naming why) (``config.json`` +
  ``model.safetensors``), plus a model card (``README.md``) with the encoder's provenance (its
  metadata) and the mimbench results found for it (run records whose encoder sha256 is this encoder's,
  searched under ``results`` or, by default, the encoder's folder). ``ViTModel``'s ``pooler``
  (dense + tanh) is not part of an encoder: transformers initialises it afresh; the features are
  ``last_hidden_state`` (the class token ``[:, 0]``), or load with ``add_pooling_layer=False``. The DINOv2 and
  I-JEPA classes are written at the encoder's own image size, where transformers does not interpolate the
  position embedding (it would by its own rule elsewhere; the model card says so).
* ``mae`` -- the official MAE checkpoint dict ``{"model": state}`` in timm key names, as MAE's
  ``main_finetune.py`` reads it (``checkpoint["model"]``, ``load_state_dict(strict=False)`` expecting only
  the head and ``fc_norm`` missing), saved with ``torch.save`` of tensors only. ViT family only, with
  LayerNorm eps 1e-6 (MAE's ``models_vit.py`` fixes it).
* ``timm`` -- the mimbench encoder file, which timm loads (docs/checkpoints.md); an encoder file is copied,
  anything else converted as ``mimbench convert`` does.

This module sits beside :mod:`mimbench.api` on the command-line layer: it reads run records
(:mod:`mimbench.results.records`) and writes through :mod:`mimbench.encoders`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import safetensors.torch
import torch

from mimbench.atomic import atomic_write, atomic_write_text
from mimbench.encoders import check_encoder_file, convert_checkpoint, encoder_sha256, is_encoder_file, open_encoder
from mimbench.encoders.arch import norm_eps, parse_arch
from mimbench.encoders.families import family_flags
from mimbench.encoders.hf import hf_folder_files
from mimbench.encoders.vit import non_plain_fields
from mimbench.errors import MimbenchError
from mimbench.results.records import RECORD_NAME, record_problems

TARGETS = ("hf", "mae", "timm")
#: LayerNorm eps of MAE's models_vit.py (partial(nn.LayerNorm, eps=1e-6)).
MAE_NORM_EPS = 1e-6


def encoder_results(encoder: Path, dirs: Iterable[Path]) -> list[dict]:
    """Finished, valid run records (``<task>-<run_id>.json``, searched recursively) made from ``encoder``."""
    sha, found = encoder_sha256(encoder), []
    for folder in dirs:
        for path in sorted(Path(folder).rglob("*.json")) if Path(folder).is_dir() else []:
            if not RECORD_NAME.match(path.name):
                continue
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if (not record_problems(record) and record.get("status") == "ok"
                    and (record.get("encoder") or {}).get("sha256") == sha):
                found.append(record)
    return found


def _metric_text(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(metrics.items())
                     if isinstance(v, (int, float)) and not isinstance(v, bool))


#: How transformers moves the stored position embedding to another image size (transformers 5.25,
#: ``interpolate_pos_encoding`` of modeling_dinov2.py, modeling_dinov2_with_registers.py, modeling_ijepa.py).
HF_INTERPOLATION = {"Dinov2Model": "bicubic to the new grid, no antialias",
                    "Dinov2WithRegistersModel": "bicubic to the new grid, with antialias",
                    "IJepaModel": "bicubic to the new grid, no antialias, only with interpolate_pos_encoding=True"}


def _card_dinov3(meta: dict, config: dict) -> list[str]:
    """Model-card usage lines of a DINOv3ViTModel folder (rotary positions: no stored grid to interpolate)."""
    regs = int(config.get("num_register_tokens") or 0)
    return ["A `DINOv3ViTModel` with the weights of a mimbench encoder. `pooler_output` is the class token after the "
            "final LayerNorm, `last_hidden_state[:, 0]`; " + (f"`[:, 1:{1 + regs}]` are the {regs} register tokens "
                                                               "(never pooled), " if regs else "")
            + f"`[:, {1 + regs}:]` the patch tokens, as mimbench computes them. Its rotary position embedding is "
            "recomputed for the grid of any input size, as mimbench's, so the features agree at every size.",
            "", f"Pooling mimbench evaluates this encoder with: k-NN {meta.get('knn_pool', 'cls')}, linear probe "
            f"{meta.get('linear_pool', 'cls+avg')} (cls+avg: the class token next to the mean of the patch tokens).",
            "", "```python", "from transformers import AutoModel", "model = AutoModel.from_pretrained(DIR)", "```"]


def _card_usage(meta: dict, config: dict) -> list[str]:
    """The model card's lines on which outputs are the encoder's features and how to load the folder."""
    cls = config["architectures"][0]
    if cls == "DINOv3ViTModel":
        return _card_dinov3(meta, config)
    if cls not in HF_INTERPOLATION:  # ViTModel, BeitModel: a pooler that is no part of the encoder
        return [f"A `{cls}` with the weights of a mimbench encoder. Its features are "
                "`last_hidden_state` (the class token is `[:, 0]`, after the final LayerNorm), as mimbench computes them.",
                "", "```python", "from transformers import AutoModel",
                "model = AutoModel.from_pretrained(DIR, add_pooling_layer=False)  # the pooler is no part of the encoder",
                "```"]
    regs = int(config.get("num_register_tokens") or 0)
    tokens = ("`last_hidden_state` holds the patch tokens only (no class token); the encoder's pooled feature is "
              "their mean, `last_hidden_state.mean(1)`" if cls == "IJepaModel" else
              "`last_hidden_state[:, 0]` is the class token (after the final LayerNorm), " +
              (f"`[:, 1:{1 + regs}]` the {regs} register tokens (never pooled, no part of a patch map), " if regs else "")
              + f"`[:, {1 + regs}:]` the patch tokens")
    size, grid = int(config["image_size"]), int(config["image_size"]) // int(config["patch_size"])
    return [f"A `{cls}` with the weights of a mimbench encoder. {tokens}, as mimbench computes them.", "",
            f"Exported at the encoder's own image size, {size}x{size} ({grid}x{grid} patches): there transformers adds "
            "the stored position embedding as it is, and the features equal mimbench's. At other sizes transformers "
            f"interpolates it by its own rule ({HF_INTERPOLATION[cls]}), which need not be the encoder's "
            f"(`pos_resample` = {meta.get('pos_resample', 'bicubic')} in mimbench), so features there may differ.",
            "", "```python", "from transformers import AutoModel", "model = AutoModel.from_pretrained(DIR)", "```"]


def model_card(meta: dict, config: dict, results: list[dict]) -> str:
    """README.md of an exported folder: what it is, how to load it, provenance, results."""
    lines = ["---", "library_name: transformers", "tags:", "- mimbench", f"- {meta.get('technique', 'unknown')}", "---",
             "", f"# {meta['arch']} ({meta.get('technique', 'unknown')}), exported by mimbench", ""]
    lines += _card_usage(meta, config)
    lines += ["", "## Provenance (the encoder's metadata)", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/') or '-'} |" for k, v in sorted(meta.items())]
    lines += ["", "## mimbench results", ""]
    if results:
        lines += ["| task | protocol | data | metrics | finished |", "|---|---|---|---|---|"]
        lines += [f"| {r['task']} | {(r.get('protocol') or {}).get('name') or '-'} | "
                  f"{(r.get('dataset') or {}).get('name') or '-'} | {_metric_text(r.get('metrics') or {})} | "
                  f"{r.get('finished', '-')} |" for r in results]
    else:
        lines.append("No run records of this encoder were found next to it.")
    return "\n".join(lines) + "\n"


def export_hf(encoder: Path, out: Path, *, layout: str = "auto", results_dirs: Iterable[Path] = ()) -> Path:
    """Write the Hugging Face folder of ``encoder`` to ``out`` (created; files in it are replaced)."""
    tensors, meta = open_encoder(encoder, layout)
    arch = parse_arch(meta, str(encoder))
    _, flags = family_flags(meta, str(encoder))
    config, state = hf_folder_files(tensors, meta, arch, flags, norm_eps(meta, str(encoder)))
    dirs = list(results_dirs) or [encoder if encoder.is_dir() else encoder.parent]
    card = model_card(meta, config, encoder_results(encoder, dirs))
    out.mkdir(parents=True, exist_ok=True)
    fix = "Choose an output folder you can write to, with free disk space."
    atomic_write(out / "model.safetensors", lambda tmp: safetensors.torch.save_file(state, tmp, metadata={"format": "pt"}),
                 what="the weights", fix=fix)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n", what="config.json", fix=fix)
    atomic_write_text(out / "README.md", card, what="the model card", fix=fix)
    return out


def export_mae(encoder: Path, out: Path, *, layout: str = "auto") -> Path:
    """Write the official MAE checkpoint dict ``{"model": state}`` of a ViT-family encoder to ``out``."""
    tensors, meta = open_encoder(encoder, layout)
    if meta.get("family", "vit") != "vit":
        raise MimbenchError(f"{encoder} is a {meta['family']}-family encoder; MAE's code builds ViTs only.",
                            "Export it with --to hf or --to timm.")
    kept = non_plain_fields(family_flags(meta, str(encoder))[1])
    if kept:  # MAE's load_state_dict(strict=False) would skip these tensors and compute other features
        raise MimbenchError(f"{encoder} has {', '.join(f'{k}={meta.get(k)}' for k in kept)} (no class token, register "
                            "tokens or layer scale), which MAE's models_vit.py does not build.",
                            "Export it with --to timm.")
    eps = norm_eps(meta, str(encoder))
    if eps != MAE_NORM_EPS:
        raise MimbenchError(f"{encoder} uses LayerNorm eps {eps:g}; MAE's models_vit.py builds eps {MAE_NORM_EPS:g}, "
                            "so its features would differ.", "Export it with --to hf or --to timm, which keep eps.")
    state = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    return atomic_write(out, lambda tmp: torch.save({"model": state}, tmp), what="the MAE checkpoint",
                        fix="Choose an output path you can write to, with free disk space.")


def export_timm(encoder: Path, out: Path, *, layout: str = "auto") -> Path:
    """The encoder file (timm-loadable): copied when ``encoder`` is one, else converted."""
    if is_encoder_file(encoder) and layout == "auto":
        return atomic_write(out, lambda tmp: shutil.copyfile(encoder, tmp), what="the encoder file",
                            fix="Choose an output path you can write to, with free disk space.")
    return convert_checkpoint(encoder, out, layout)


def export(encoder, to: str, out, *, layout: str = "auto", results_dirs: Iterable = ()) -> Path:
    """Export ``encoder`` (file, checkpoint or HF folder) ``to`` one of :data:`TARGETS` at ``out``."""
    encoder, out = check_encoder_file(encoder), Path(out)
    if to not in TARGETS:
        raise MimbenchError(f"Unknown export target {to!r}.", f"Use one of: {', '.join(TARGETS)}.")
    if to == "hf":
        if out.exists() and not out.is_dir():
            raise MimbenchError(f"{out} exists and is not a folder.", "Give a folder for --to hf.")
        return export_hf(encoder, out, layout=layout, results_dirs=[Path(d) for d in results_dirs])
    if out.is_dir():
        raise MimbenchError(f"{out} is a folder; --to {to} writes one file.", "Give a file path, e.g. enc.pth.")
    return (export_mae if to == "mae" else export_timm)(encoder, out, layout=layout)
