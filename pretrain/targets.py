"""Pixel reconstruction targets and the reconstruction loss.

Patch layout (official MAE ``patchify``): an image ``N x C x H x W`` with patch size ``p`` becomes
``N x L x (p*p*C)`` with patches in row-major order over the ``H/p x W/p`` grid and, inside a
patch, pixels in row-major order with the channel fastest (``h, w, p, q, c``).

Target normalisation (``TargetNorm``), modes:

``"none"``
    raw (already dataset-normalised) pixels.
``"patch"``
    the official ``norm_pix_loss``: every patch by its own mean and *unbiased* variance over its
    ``p*p*C`` values, ``(x - mean) / sqrt(var + 1e-6)``.
``"batch"`` / ``"ema"`` (population modes, this project's reading of the robust-MAE paper,
which only says that per-patch normalisation needs statistics of a population)
    the population statistics are one mean and one (biased) variance pooled over *all pixel values
    of all patches* of the batch (visible and masked alike; across all processes when
    ``torch.distributed`` is initialised), i.e. the same kind of scalar statistic that
    per-patch normalisation computes per patch, so the two can be blended like with like.
    ``"batch"`` uses the current batch; ``"ema"`` an exponential moving average of the batch
    statistics over training (``running = m * running + (1 - m) * batch``, initialised with the
    first batch, frozen in eval mode). Each patch is then normalised with
    ``mean = a * patch_mean + (1 - a) * pop_mean`` and ``var = a * patch_var + (1 - a) * pop_var``,
    ``a = alpha``: a = 1 is per-patch normalisation, a = 0 pure population normalisation, and
    values in between shrink each patch's statistics towards the population's, so that
    low-contrast patches are no longer blown up to unit variance (smoothed inter-patch variance).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mimbench.errors import MimbenchError

TARGET_NORM_MODES = ("none", "patch", "batch", "ema")
PIXEL_EPS = 1e-6  # official norm_pix_loss epsilon, added to the variance


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``N x C x H x W`` -> ``N x L x (p*p*C)`` in the official MAE order (see module docstring)."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise MimbenchError(f"Image size {h}x{w} is not divisible by patch size {p}.", "Resize or crop the images.")
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, in_chans: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square grid: ``N x L x (p*p*C)`` -> ``N x C x H x W``."""
    n, num_patches, _ = x.shape
    g = int(round(num_patches**0.5))
    if g * g != num_patches:
        raise MimbenchError(f"unpatchify needs a square patch grid, got L={num_patches}.")
    p = patch_size
    x = x.reshape(n, g, g, p, p, in_chans).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, in_chans, g * p, g * p)


def patch_stats(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and unbiased variance over the last dim: ``N x L x P`` -> two ``N x L x 1``."""
    return target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)


@torch.no_grad()
def population_stats(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of every value of ``target`` (0-d tensors, float32).

    Sums are accumulated in float64 (so ``E[x^2] - E[x]^2`` does not cancel) and, when
    ``torch.distributed`` is initialised, summed over all processes: the population is the
    global batch, whatever the per-device batch size.
    """
    t = target.detach().double()
    sums = torch.stack([t.sum(), (t * t).sum(), t.new_tensor(float(t.numel()))])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    mean = sums[0] / sums[2]
    var = (sums[1] / sums[2] - mean * mean).clamp_min(0.0)
    return mean.float(), var.float()


def normalize(target: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float = PIXEL_EPS) -> torch.Tensor:
    """``(target - mean) / sqrt(var + eps)`` with broadcasting (the official norm_pix_loss formula)."""
    return (target - mean) / (var + eps) ** 0.5


def per_patch_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over the pixels of each patch: two ``N x L x P`` -> ``N x L``."""
    return ((pred - target) ** 2).mean(dim=-1)


def masked_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``loss`` (``N x L``) over the positions where ``mask`` (``N x L``, 1 = removed) is 1."""
    return (loss * mask).sum() / mask.sum()


class TargetNorm(nn.Module):
    """Normalises patchified pixel targets (``N x L x P``); see the module docstring for the modes.

    Args:
        mode: one of ``TARGET_NORM_MODES``.
        alpha: weight of each patch's own statistics in the population modes (0 = pure
            population, 1 = per-patch); ignored by ``"none"`` and ``"patch"``.
        momentum: EMA momentum ``m`` of mode ``"ema"``.
        eps: added to the variance.

    Buffers ``running_mean``, ``running_var`` and ``num_updates`` exist only in mode ``"ema"``, so
    in every other mode the module adds nothing to a model's state dict.
    """

    def __init__(self, mode: str = "none", alpha: float = 0.5, momentum: float = 0.99, eps: float = PIXEL_EPS) -> None:
        super().__init__()
        if mode not in TARGET_NORM_MODES:
            raise MimbenchError(
                f"Unknown target_norm {mode!r}.", f"Use one of: {', '.join(TARGET_NORM_MODES)}."
            )
        if not 0.0 <= float(alpha) <= 1.0:
            raise MimbenchError(f"target_norm_alpha must be in [0, 1], got {alpha!r}.")
        if not 0.0 <= float(momentum) < 1.0:
            raise MimbenchError(f"target_norm_momentum must be in [0, 1), got {momentum!r}.")
        self.mode = mode
        self.alpha = float(alpha)
        self.momentum = float(momentum)
        self.eps = float(eps)
        if mode == "ema":
            self.register_buffer("running_mean", torch.zeros(()))
            self.register_buffer("running_var", torch.ones(()))
            self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, alpha={self.alpha}, momentum={self.momentum}, eps={self.eps}"

    @torch.no_grad()
    def _ema_stats(self, target: torch.Tensor, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if update:
            # Branch-free in tensors (the first update copies the batch statistics, later ones blend them):
            # no host read of num_updates, so a compiled training step has neither a graph break nor a
            # value guard. ``running * m + (1 - m) * stat`` rounds as the in-place ``mul_(m).add_(...)``.
            mean, var = population_stats(target)
            first = self.num_updates == 0
            m = self.momentum
            self.running_mean.copy_(torch.where(first, mean, self.running_mean * m + (1 - m) * mean))
            self.running_var.copy_(torch.where(first, var, self.running_var * m + (1 - m) * var))
            self.num_updates.add_(1)
        elif int(self.num_updates) == 0:  # evaluation only: the training step never reads the buffer back
            raise MimbenchError(
                "target_norm='ema' has no running statistics yet (no training step has been taken).",
                "Run at least one training-mode forward pass, or load a checkpoint that has them.",
            )
        return self.running_mean.clone(), self.running_var.clone()

    def forward(self, target: torch.Tensor, update: bool | None = None) -> torch.Tensor:
        """Normalise ``target`` (``N x L x P``, no gradient needed).

        ``update`` (default: ``self.training``) says whether mode ``"ema"`` folds this batch into
        its running statistics; call it once per training step.
        """
        if self.mode == "none":
            return target
        if self.mode == "patch":
            mean, var = patch_stats(target)
            return normalize(target, mean, var, self.eps)
        if self.mode == "batch":
            pop_mean, pop_var = population_stats(target)
        else:
            pop_mean, pop_var = self._ema_stats(target, self.training if update is None else update)
        a = self.alpha
        if a == 0.0:
            return normalize(target, pop_mean, pop_var, self.eps)
        mean, var = patch_stats(target)
        return normalize(target, a * mean + (1 - a) * pop_mean, a * var + (1 - a) * pop_var, self.eps)
