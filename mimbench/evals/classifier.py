"""The fine-tuned classifier file: what ``mimbench eval finetune`` keeps so that later evaluations need no retraining.

A classifier file (``OUT/model.safetensors`` of a fine-tune run, :data:`MODEL_FILE`) is a safetensors file whose
tensors are the state dict of the fine-tuned timm model -- encoder, pooled-feature norm ``fc_norm`` and linear
head -- and whose string metadata says how to rebuild and feed it and where it came from:

    format            mimbench-classifier/1 (:data:`FORMAT_TAG`)
    encoder_metadata  the encoder file's metadata (JSON): architecture and family flags rebuild the timm model
    model_kwargs      the timm options of the fine-tuned model (JSON: pooling, fc_norm, num_classes)
    img_size          the input resolution it was fine-tuned and validated at
    classes           the class names in label order (JSON; ImageNet folders: the 1000 wnids)
    mean, std         the input normalisation (JSON)
    data              the fine-tune's data (``builtin:fashion-mnist`` or the folder)
    eval_transform    the validation pre-processing, as the fine-tune's record says it
    provenance        the fine-tune record's run id, task, protocol, encoder, dataset, metrics, seed and versions (JSON)

:func:`load_classifier` rebuilds the model in eval mode from the file alone (the encoder file need not exist any
more) and loads every tensor strictly: the same logits as the model the fine-tune ended with.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch
from safetensors import safe_open

from mimbench.atomic import atomic_write
from mimbench.encoders.arch import norm_eps, parse_arch
from mimbench.encoders.families import family_flags
from mimbench.errors import MimbenchError

FORMAT_TAG = "mimbench-classifier/1"
MODEL_FILE = "model.safetensors"
#: The record fields a classifier file keeps as its provenance.
PROVENANCE_FIELDS = ("run_id", "task", "protocol", "encoder", "dataset", "metrics", "seed", "finished", "versions")
JSON_FIELDS = ("encoder_metadata", "model_kwargs", "classes", "mean", "std", "provenance")

__all__ = ["FORMAT_TAG", "MODEL_FILE", "classifier_path", "load_classifier", "read_classifier_metadata",
           "save_classifier"]


def save_classifier(model: torch.nn.Module, path, *, record: Mapping, encoder_metadata: Mapping[str, str],
                    model_kwargs: Mapping[str, Any], img_size: int, classes, mean, std, data: str,
                    eval_transform: str) -> Path:
    """Write ``model`` (a timm classifier built from an encoder with ``model_kwargs``) and its provenance
    (``record``, the fine-tune's run record) to ``path`` atomically; returns the path."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    values = {"encoder_metadata": dict(encoder_metadata), "model_kwargs": dict(model_kwargs),
              "classes": [str(c) for c in classes], "mean": [float(m) for m in mean], "std": [float(s) for s in std],
              "provenance": {k: record.get(k) for k in PROVENANCE_FIELDS}}
    meta = {"format": FORMAT_TAG, "img_size": str(int(img_size)), "data": str(data),
            "eval_transform": str(eval_transform), **{k: json.dumps(v) for k, v in values.items()}}
    path = Path(path)
    atomic_write(path, lambda tmp: safetensors.torch.save_file(state, str(tmp), metadata=meta),
                 what="the fine-tuned model", fix="Give an output folder you can write to (and has free space).")
    return path


def classifier_path(path) -> Path:
    """``path`` itself (a classifier file) or, for a fine-tune run folder, its :data:`MODEL_FILE`;
    MimbenchError when neither is there."""
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise MimbenchError(f"No fine-tuned model at {file}.",
                            "Pass the folder of a `mimbench eval finetune` run (it holds model.safetensors) or "
                            "the model file itself; runs made before the fine-tune saved its model need re-running.")
    return file


def read_classifier_metadata(path) -> dict[str, Any]:
    """The metadata of a classifier file (or a fine-tune folder's), JSON fields decoded; MimbenchError when the
    file is not one."""
    file = classifier_path(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for a damaged or foreign file
        raise MimbenchError(f"{file} is not a readable safetensors file ({err}).",
                            "Re-run the fine-tune that wrote it.") from None
    if meta.get("format") != FORMAT_TAG:
        raise MimbenchError(f"{file} is not a fine-tuned classifier file (format {meta.get('format')!r}, "
                            f"expected {FORMAT_TAG!r}).",
                            "Pass the model.safetensors a `mimbench eval finetune` run writes (an encoder file has "
                            "no classifier head).")
    for key in JSON_FIELDS:
        meta[key] = json.loads(meta[key])
    meta["img_size"] = int(meta["img_size"])
    return meta


def load_classifier(path) -> torch.nn.Module:
    """The fine-tuned classifier of a classifier file (or a fine-tune folder) as a timm model in eval mode, every
    tensor loaded strictly; ``model.mimbench_classifier`` holds its metadata (:func:`read_classifier_metadata`)."""
    file = classifier_path(path)
    meta = read_classifier_metadata(file)
    enc = meta["encoder_metadata"]
    arch = parse_arch(enc, where=str(file))
    family, flags = family_flags(enc, str(file))
    state = safetensors.torch.load_file(str(file))
    model = family.build(arch, flags, img_size=meta["img_size"], in_chans=int(state["patch_embed.proj.weight"].shape[1]),
                         norm_eps=norm_eps(enc, str(file)), **meta["model_kwargs"])
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise MimbenchError(f"{file}: the tensors do not fit the model its metadata describes (missing: "
                            f"{', '.join(result.missing_keys[:5]) or '-'}; unexpected: "
                            f"{', '.join(result.unexpected_keys[:5]) or '-'}).", "Re-run the fine-tune that wrote it.")
    model.mimbench_classifier = meta
    return model.eval()
