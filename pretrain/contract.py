"""The pre-training model contract: everything the loop, the export, the random-init control and the
benchmark may use of a model, declared once (:class:`PretrainModel`) and checked once (:func:`check_model`).

A model declares, as class attributes:

``mask_input``
    how it takes its mask (:data:`MASK_INPUTS`): ``"noise"`` - ``forward(imgs, mask_ratio, noise=)``
    with ``noise`` ``N x L`` uniform (lowest kept; the MAE family); ``"blocks"`` -
    ``forward(imgs, mask_ratio, mask=)`` with ``mask`` ``N x L`` bool from the model's
    ``draw_mask(n, mask_ratio, device=, generators=)`` (BEiT v2); ``"none"`` - the model masks nothing
    (the VQ-KD tokenizer sees whole images).
``exports``, ``encoder_family``, ``export_name``
    what :meth:`export` writes (:data:`EXPORTS`): an encoder file of family ``"vit"`` or ``"beit"``
    (``encoder.safetensors``) or a tokenizer file (family ``"vqkd"``, ``tokenizer.safetensors``).

and implements ``forward(imgs N x C x H x W, mask_ratio, ...) -> (loss, output, mask)``;
``encoder_arch()`` (``img_size``, ``patch_size`` and, for the file's metadata, ``embed_dim``,
``depth``, ``num_heads``, ``mlp_ratio``); ``encoder_state_dict()`` (the tensors of the exported file,
detached); ``encoder_family_metadata()`` (extra string fields of the file); ``no_weight_decay()``
(parameter names kept out of weight decay); ``on_step_end(it, total_its)`` (after every optimizer
step: per-step schedules) and ``set_progress(next_it, total_its)`` (put those schedules where an
uninterrupted run has them before step ``next_it``, e.g. on resume); ``loss_terms`` (floats of the last
forward's loss terms); ``export(path, *, technique, config_sha256, epochs, data, extra)``.

:class:`StepContract` is the mixin that writes the shared pieces once (loss terms, no-op schedules,
the encoder-file export); :func:`export_encoder` is the one export entry point every caller uses.
"""
from __future__ import annotations

import abc
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from mimbench.encoders import arch_name, save_encoder
from mimbench.errors import MimbenchError

MASK_INPUTS = ("noise", "blocks", "none")
EXPORTS = ("encoder", "tokenizer")
ENCODER_FILE = "encoder.safetensors"
TOKENIZER_FILE = "tokenizer.safetensors"


@runtime_checkable
class PretrainModel(Protocol):
    """What a pre-training model provides (module docstring); ``isinstance`` checks the names exist,
    :func:`check_model` also the declared values."""

    mask_input: str
    exports: str
    encoder_family: str
    export_name: str

    @property
    def loss_terms(self) -> dict[str, float]: ...

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, **mask) -> tuple: ...

    def encoder_arch(self) -> dict: ...

    def encoder_state_dict(self) -> dict[str, torch.Tensor]: ...

    def encoder_family_metadata(self) -> dict[str, str]: ...

    def no_weight_decay(self) -> set[str]: ...

    def on_step_end(self, it: int, total_its: int) -> None: ...

    def set_progress(self, next_it: int, total_its: int) -> None: ...

    def export(self, path, *, technique: str, config_sha256: str = "", epochs: float = 0, data: str = "",
               extra: Mapping[str, str] | None = None) -> Path: ...


#: The names of the contract, for the error that lists what a model lacks.
CONTRACT_NAMES = ("mask_input", "exports", "encoder_family", "export_name", "loss_terms", "forward", "encoder_arch",
                  "encoder_state_dict", "encoder_family_metadata", "no_weight_decay", "on_step_end", "set_progress",
                  "export")


def check_model(model, name: str | None = None):
    """``model`` if it implements :class:`PretrainModel` with valid declarations, else :class:`MimbenchError`
    naming what is missing or wrong."""
    what = f"Pre-training model {name or type(model).__name__!r}"
    fix = "Derive it from pretrain.contract.StepContract and declare mask_input, exports, encoder_family."
    if not isinstance(model, PretrainModel):
        missing = [n for n in CONTRACT_NAMES if not hasattr(type(model), n)]
        raise MimbenchError(f"{what} does not implement the pre-training contract: it lacks {', '.join(missing)}.", fix)
    if model.mask_input not in MASK_INPUTS:
        raise MimbenchError(f"{what} declares mask_input={model.mask_input!r}.",
                            f"Use one of: {', '.join(MASK_INPUTS)}.")
    if model.exports not in EXPORTS:
        raise MimbenchError(f"{what} declares exports={model.exports!r}.", f"Use one of: {', '.join(EXPORTS)}.")
    if model.mask_input == "blocks" and not callable(getattr(model, "draw_mask", None)):
        raise MimbenchError(f"{what} takes block masks but has no draw_mask(n, mask_ratio, device=, generators=).", fix)
    return model


def export_encoder(model, path, *, technique: str, config_sha256: str = "", epochs: float = 0, data: str = "",
                   extra: Mapping[str, str] | None = None) -> Path:
    """Write what ``model`` exports (its encoder file, or a tokenizer's file) to ``path``; returns ``path``.

    ``technique``, ``config_sha256``, ``epochs`` (pre-training epochs, 0 = none) and ``data`` go into the
    file's metadata, ``extra`` adds string fields."""
    check_model(model)
    return model.export(path, technique=technique, config_sha256=config_sha256, epochs=epochs, data=data,
                        extra=extra)


class StepContract:
    """Mixin with the contract's shared pieces (put it before ``nn.Module`` in the bases): a model's
    ``forward`` stores its detached loss terms in ``self._loss_terms`` (``dict[str, Tensor]``);
    ``loss_terms`` converts them to floats only when the log asks (no device sync per step). Nothing is
    scheduled per step unless a model overrides ``on_step_end`` / ``set_progress``; ``export`` writes the
    encoder file from ``encoder_state_dict()`` and ``encoder_arch()``."""

    _loss_terms: Mapping[str, torch.Tensor] = MappingProxyType({})  # none before the first forward
    export_name = ENCODER_FILE

    @property
    def loss_terms(self) -> dict[str, float]:
        """Per-term losses of the last forward as floats."""
        return {k: float(v) for k, v in self._loss_terms.items()}

    def on_step_end(self, it: int, total_its: int) -> None:
        """Called after every optimizer step; nothing is scheduled per step unless a model overrides it."""
        return None

    def set_progress(self, next_it: int, total_its: int) -> None:
        """Put per-step schedules where they are before step ``next_it`` (nothing to do by default)."""
        return None

    def encoder_family_metadata(self) -> dict[str, str]:
        """Extra fields of the encoder file (none for the ViT family)."""
        return {}

    def export(self, path, *, technique: str, config_sha256: str = "", epochs: float = 0, data: str = "",
               extra: Mapping[str, str] | None = None) -> Path:
        """Write the encoder file (:func:`mimbench.encoders.save_encoder`) of family ``encoder_family``."""
        arch = self.encoder_arch()
        return save_encoder(self.encoder_state_dict(), path, family=self.encoder_family,
                            arch=arch_name(arch["embed_dim"], arch["depth"], arch["patch_size"]),
                            technique=technique, config_sha256=config_sha256, epochs=epochs, data=data,
                            extra={**self.encoder_family_metadata(), **(extra or {})}, **arch)


class VisualTokenizer(nn.Module, abc.ABC):
    """What BEiT v2 pre-training needs from a tokenizer: ``num_tokens`` (vocabulary size), ``grid_size``
    (``(H, W)`` token grid, one token per encoder patch) and ``tokenize``; abstract, so a subclass without
    ``tokenize`` cannot be instantiated."""

    num_tokens: int
    grid_size: tuple[int, int]

    @abc.abstractmethod
    def tokenize(self, imgs: torch.Tensor) -> torch.Tensor:
        """Visual-token ids (N × grid_h·grid_w, int64) of images N×3×H×W."""
