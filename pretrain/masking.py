"""Random patch masking for masked image modelling.

Conventions (those of the official MAE code, which every model here keeps):

* ``noise`` is an ``N x L`` tensor, one value per patch; per sample the patches are sorted by
  ascending noise and the ``len_keep`` lowest-noise patches stay visible. Passing the same noise
  therefore fixes the mask exactly; without noise a fresh ``torch.rand`` draw is used.
* ``ids_shuffle`` (``N x L``) lists patch indices in that order (kept first, then the removed
  ones in ascending noise); ``ids_restore`` is its inverse permutation, so gathering a sequence in
  shuffled order with ``ids_restore`` puts every token back at its patch position.
* ``mask`` is ``N x L`` float with ``1 = removed`` (masked) and ``0 = kept``.
* ``len_keep = int(L * (1 - mask_ratio))`` - truncation, exactly as the official code, so for
  ratios where ``L * (1 - ratio)`` is fractional the floor is kept (196 patches at ratio 0.6 keep 78).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from mimbench.errors import MimbenchError


class Masking(NamedTuple):
    """Result of :func:`random_masking`; all index tensors are ``int64`` of shape ``N x L`` unless noted."""

    ids_shuffle: torch.Tensor  # N x L, kept patches first (ascending noise)
    ids_restore: torch.Tensor  # N x L, inverse permutation of ids_shuffle
    mask: torch.Tensor  # N x L float, 1 = removed
    len_keep: int


def num_keep(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches per sample: ``int(L * (1 - mask_ratio))`` (official truncation)."""
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise MimbenchError(
            f"mask_ratio must be in [0, 1), got {mask_ratio!r}.",
            "Use e.g. mask_ratio=0.75 (MAE's default); at least one patch has to stay visible.",
        )
    return int(num_patches * (1 - mask_ratio))


def check_noise(noise: torch.Tensor, batch: int, num_patches: int) -> None:
    """Raise :class:`MimbenchError` unless ``noise`` is a floating ``batch x num_patches`` tensor."""
    if not torch.is_tensor(noise) or noise.shape != (batch, num_patches) or not noise.is_floating_point():
        shape = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
        raise MimbenchError(
            f"noise must be a floating tensor of shape (N, L) = ({batch}, {num_patches}), got {shape}.",
            "Pass one value per patch and image (e.g. torch.rand(N, L)); the lowest values are kept visible.",
        )


def random_masking(
    batch: int, num_patches: int, mask_ratio: float, noise: torch.Tensor | None = None, device=None
) -> Masking:
    """Per-sample random masking by sorting uniform noise (lowest noise = kept).

    Returns :class:`Masking`. ``noise`` (``N x L``) fixes the mask; when ``None`` it is drawn
    with ``torch.rand`` on ``device``.
    """
    len_keep = num_keep(num_patches, mask_ratio)
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device)
    else:
        check_noise(noise, batch, num_patches)
        if device is not None and noise.device != torch.device(device):
            noise = noise.to(device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    # Build the mask in shuffled order (kept first) and unshuffle it.
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return Masking(ids_shuffle, ids_restore, mask, len_keep)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select tokens per sample: ``x`` N x L x D, ``ids`` N x K -> N x K x D."""
    return torch.gather(x, dim=1, index=ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def num_inserted(num_masked: int, mask_token_ratio: float) -> int:
    """How many masked positions receive an encoder mask token: ``round(num_masked * ratio)``.

    Rounding (not truncation) so that e.g. 0.29 of 100 masked patches gives 29 despite the
    binary representation of 0.29; ratio 1 gives every masked position.
    """
    return int(round(num_masked * float(mask_token_ratio)))
