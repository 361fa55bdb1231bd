"""The random-initialisation control: an encoder of the same architecture, never trained.

Every small-scale number needs this row beside it (at CPU size a linear probe on random features is
already strong). Two ways to say which architecture:

- ``config``: a pre-training config. The control is that config's model built at ``seed`` with its own
  initialisation (for MAE: sin-cos position embeddings, xavier-uniform linears), and its encoder
  exported -- exactly the encoder that pre-training would start from, minus the training.
  A BEiT v2 config gives a BEiT-family control (its tokenizer file must exist: the model is built whole).
- ``like``: an encoder file (ViT family). The control is an MAE model of the file's architecture
  (img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio) built at ``seed``; the decoder does not
  matter, since the encoder's parameters are initialised before the decoder's.

The file is an ordinary encoder file with ``technique=random-init``, ``epochs=0``, ``data=none``; its
``config_sha256`` is the hash of its recipe (:func:`control_sha256`: the resolved config or the reference
architecture, and the seed), so that a pipeline can tell whether an existing control is the one asked for.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch

from mimbench.config import config_sha256, load_config
from mimbench.encoders import read_metadata
from mimbench.errors import MimbenchError
from pretrain.contract import export_encoder
from pretrain.registry import create_model, model_spec

TECHNIQUE = "random-init"
ARCH_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")


def _reference_arch(like: Path) -> dict:
    meta = read_metadata(like)
    family = meta.get("family", "vit")
    if family != "vit":
        raise MimbenchError(f"{like} is a {family!r} encoder; a control --like it is built only for ViTs.",
                            "Give the pre-training config it came from instead: mimbench control --config CFG.")
    arch = {k: int(meta[k]) for k in ARCH_FIELDS}
    arch["mlp_ratio"] = float(meta.get("mlp_ratio", 4.0))
    return {"arch_name": meta["arch"], **arch}


def control_sha256(*, like: Path | None = None, config: Path | None = None, overrides: Sequence[str] = (),
                   seed: int = 0) -> str:
    """Hash of what defines a control: the resolved pre-training config (or the reference architecture) and
    the seed. Stored as the control file's ``config_sha256``."""
    _check_one(like, config)
    if config is not None:
        recipe = {"config_sha256": config_sha256(load_config(config, list(overrides)))}
    else:
        recipe = {"like": _reference_arch(Path(like))}
    blob = json.dumps({"control": TECHNIQUE, "seed": int(seed), **recipe}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _check_one(like, config) -> None:
    if (like is None) == (config is None):
        raise MimbenchError("A control needs exactly one of an encoder to copy (--like) and a pre-training "
                            "config (--config).",
                            "Example: mimbench control --config pretrain/configs/mae_tiny_fmnist.py --out "
                            "runs/control/encoder.safetensors")


def build_control(out: str | Path, *, like: str | Path | None = None, config: str | Path | None = None,
                  overrides: Sequence[str] = (), seed: int = 0) -> Path:
    """Write the random-initialisation control encoder to ``out`` (a ``.safetensors`` file); returns its path.

    ``like``: an encoder file whose architecture to copy; ``config`` (+ ``overrides``): a pre-training config
    whose model to build. Exactly one of them. ``seed`` seeds the initialisation (the global RNG state is
    restored afterwards).
    """
    _check_one(like, config)
    recipe = control_sha256(like=like, config=config, overrides=overrides, seed=seed)
    name, kwargs, source = _control_model(like, config, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = create_model(name, **kwargs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return export_encoder(model, out, technique=TECHNIQUE, config_sha256=recipe, epochs=0, data="none",
                          extra={"control_seed": str(int(seed)), "control_of": source})


def _control_model(like, config, overrides: Sequence[str]) -> tuple[str, dict, str]:
    """(registry name, constructor arguments, what the control copies) of the control's model."""
    if config is not None:
        spec = model_spec(load_config(config, list(overrides)))
        if spec.exports != "encoder":
            raise MimbenchError(f"The model of config {Path(config).name} ({spec.name}) exports a {spec.exports}, not "
                                "an encoder; a control is an encoder.",
                                "Give the config of an encoder pre-training (MAE, DDAE, BEiT v2, ...).")
        return spec.name, spec.kwargs, f"config {Path(config).name}"
    ref = _reference_arch(Path(like))
    # the smallest decoder: only the encoder is kept, and its initialisation does not depend on the decoder
    kwargs = {**{k: ref[k] for k in (*ARCH_FIELDS, "mlp_ratio")},
              "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 1}
    return "mae", kwargs, f"like {Path(like).name}"


def is_control(path: Path, *, like=None, config=None, overrides: Sequence[str] = (), seed: int = 0) -> bool:
    """``path`` is a control file made by exactly this recipe (same config/architecture and seed)."""
    path = Path(path)
    if not path.is_file():
        return False
    meta = read_metadata(path)
    return meta.get("technique") == TECHNIQUE and meta.get("config_sha256") == control_sha256(
        like=like, config=config, overrides=overrides, seed=seed)


__all__ = ["TECHNIQUE", "build_control", "control_sha256", "is_control"]
