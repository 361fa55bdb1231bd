"""Deep Dynamic AutoEncoder (DDAE) building blocks: distance map, dynamic weights, beta schedules.

DDAE's premise: a masked patch far from every visible patch is harder to reconstruct than one
next to a visible patch, so masked patches should not all be weighted alike. The paper (known
to us only from its abstract and introduction) leaves the formulas open; what follows is this
project's interpretation, every choice a knob (docs/techniques.md, section DDAE).

Distance map (:func:`distance_map`)
    For each masked patch, the distance on the ``H x W`` patch grid (row/column index units)
    to the *nearest* visible patch; 0 on visible patches. Metrics: ``"euclidean"`` (default),
    ``"chebyshev"`` (8-neighbourhood rings), ``"manhattan"`` (4-neighbourhood steps).
    Normalisation: ``"max"`` (default) divides by each image's largest distance, so values lie in
    [0, 1] and the farthest masked patch of every image has 1 - the difficulty is relative to the
    image's own mask; ``"grid"`` divides by the largest distance two patches of the grid can have
    (a fixed scale, values in [0, 1], comparable across images); ``"none"`` keeps grid units.

Dynamic weights (:func:`dynamic_weights`)
    ``w_i = n * exp(beta * d_i) / sum_j exp(beta * d_j)`` over the ``n`` masked patches of an
    image (visible patches get 0). Why this function: it is positive and monotone in ``d`` with
    the direction set by the sign of ``beta`` (``beta < 0`` favours near/easy patches, ``beta > 0``
    far/hard ones), ``beta = 0`` gives weight 1 everywhere (plain MAE); with ``d`` in [0, 1] the
    ratio between the hardest and the easiest patch's weight is exactly ``exp(|beta|)``, so
    ``beta`` reads as a log-ratio; and because the weights average to 1 over each image's masked
    patches, the weighted loss keeps MAE's scale - beta only redistributes emphasis, it cannot
    shrink the loss by down-weighting everything.

Beta per supervised depth (:class:`DynamicBeta`)
    ``"scheduled"``: ``beta(p) = beta_start + (beta_end - beta_start) * s(p)`` with training
    progress ``p`` in [0, 1] and ``s`` linear or cosine (``(1 - cos(pi p)) / 2``), the same for
    every depth; default -1 -> +1, i.e. near patches count e times more than the farthest at the
    start, the farthest e times more at the end.
    ``"learnable"``: the schedule plus a learnable per-depth offset bounded by tanh,
    ``beta_k(p) = beta(p) + bound * tanh(theta_k)``, ``theta_k`` initialised at 0. Minimising the
    reconstruction loss over beta alone always favours the easiest patches (the derivative of the
    weighted loss with respect to beta is the weighted covariance of distance and loss, which is
    positive as soon as far patches are harder), so an unconstrained beta would collapse towards
    -inf and undo the curriculum. The bound keeps every beta within ``bound`` of the schedule;
    with the defaults (bound 0.5 < beta_end 1) the end of training still favours far patches.
    An optional L2 penalty ``beta_reg * sum_k (bound * tanh(theta_k))**2`` (added to the loss by
    the model) gives an interior equilibrium instead of the bound, where each depth's offset
    reflects how strongly its loss grows with distance.
    ``"fixed"``: ``beta_start`` throughout (``beta_start = 0`` is plain MAE weighting).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mimbench.errors import MimbenchError

DISTANCE_METRICS = ("euclidean", "chebyshev", "manhattan")
DISTANCE_NORMALIZATIONS = ("max", "grid", "none")
BETA_MODES = ("scheduled", "learnable", "fixed")
BETA_SCHEDULES = ("linear", "cosine")


class NoVisiblePatchError(MimbenchError, ValueError):
    """A distance map was asked for an image whose patches are all masked."""


def _grid_hw(grid_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(grid_size, int):
        h = w = grid_size
    else:
        h, w = (int(v) for v in grid_size)
    if h <= 0 or w <= 0:
        raise MimbenchError(f"grid_size must be positive, got {grid_size!r}.")
    return h, w


def grid_coords(grid_size: int | Sequence[int], device=None) -> torch.Tensor:
    """``(H*W) x 2`` float coordinates ``(row, column)`` of the patches in row-major order."""
    h, w = _grid_hw(grid_size)
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
    return torch.stack([rows, cols], dim=1)


def _pairwise(coords: torch.Tensor, metric: str) -> torch.Tensor:
    diff = (coords[:, None, :] - coords[None, :, :]).abs()
    if metric == "euclidean":
        # sqrt of a sum of squared integers: exact for the small integers of a patch grid.
        return diff.pow(2).sum(-1).sqrt()
    if metric == "chebyshev":
        return diff.amax(-1)
    return diff.sum(-1)


def distance_map(
    mask: torch.Tensor,
    grid_size: int | Sequence[int],
    metric: str = "euclidean",
    normalize: str = "max",
    check: bool = True,
) -> torch.Tensor:
    """Distance of every masked patch to the nearest visible patch on the patch grid.

    Args:
        mask: ``N x L`` (1 = masked, 0 = visible; any dtype), patches in row-major order.
        grid_size: ``G`` for a ``G x G`` grid or ``(H, W)``, with ``H * W == L``.
        metric: ``"euclidean"``, ``"chebyshev"`` or ``"manhattan"``, in grid (patch) units.
        normalize: ``"max"`` (divide by each image's largest distance; values in [0, 1]),
            ``"grid"`` (divide by the grid's largest possible distance) or ``"none"``.
        check: look for images without a visible patch (a device synchronisation; callers that
            know every image keeps a patch, e.g. from the mask ratio, may skip it).

    Returns:
        ``N x L`` float32 on ``mask``'s device: 0 on visible patches, >= 1 grid unit (before
        normalisation) on masked ones. An image without masked patches is all zeros.

    Raises:
        NoVisiblePatchError (a ``ValueError`` and ``MimbenchError``) when an image has no
        visible patch, where "nearest visible patch" is undefined.
    """
    if metric not in DISTANCE_METRICS:
        raise MimbenchError(f"Unknown distance metric {metric!r}.", f"Use one of: {', '.join(DISTANCE_METRICS)}.")
    if normalize not in DISTANCE_NORMALIZATIONS:
        raise MimbenchError(
            f"Unknown distance normalisation {normalize!r}.", f"Use one of: {', '.join(DISTANCE_NORMALIZATIONS)}."
        )
    h, w = _grid_hw(grid_size)
    if mask.ndim != 2 or mask.shape[1] != h * w:
        raise MimbenchError(
            f"mask must be N x L with L = {h}*{w} = {h * w} patches, got shape {tuple(mask.shape)}."
        )
    masked = mask.detach() > 0.5
    if check and bool(masked.all(dim=1).any()):
        bad = torch.nonzero(masked.all(dim=1)).flatten().tolist()
        raise NoVisiblePatchError(
            f"Images {bad[:8]} have no visible patch, so no masked patch has a nearest visible one.",
            "Use a mask ratio below 1 (at least one patch must stay visible).",
        )
    pair = _pairwise(grid_coords((h, w), device=mask.device), metric)  # L x L
    # N x L x L: distance from patch i to patch j, +inf where j is masked; min over j.
    cand = pair.unsqueeze(0).masked_fill(masked.unsqueeze(1), float("inf"))
    dist = cand.amin(dim=2).masked_fill(~masked, 0.0)
    if normalize == "max":
        dist = dist / dist.amax(dim=1, keepdim=True).clamp_min(1.0)
    elif normalize == "grid":
        dist = dist / pair.max().clamp_min(1.0)
    return dist


def dynamic_weights(dist: torch.Tensor, mask: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """Per-patch loss weights ``w = n * softmax(beta * d)`` over each image's ``n`` masked patches.

    Args:
        dist: ``N x L`` distances (e.g. from :func:`distance_map`), no gradient needed.
        mask: ``N x L`` (1 = masked).
        beta: scalar (float or 0-d tensor, may require grad): < 0 favours near patches, > 0 far ones.

    Returns:
        ``N x L`` weights, 0 on visible patches, mean 1 over the masked patches of every image
        that has any (a masked softmax times ``n``, shifted so large ``|beta|`` cannot overflow).
    """
    masked = mask > 0.5
    logits = (beta * dist).masked_fill(~masked, float("-inf"))
    # Subtract each image's largest masked logit so exp cannot overflow; images without masked
    # patches get 0 instead of -inf (their weights are zeroed below).
    top = logits.amax(dim=1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(logits - top.detach())
    n = masked.sum(dim=1, keepdim=True).to(e.dtype)
    # e / mean(e over masked): with beta = 0 every masked e is exactly 1, so the weights are
    # exactly 1 (bit-identical to MAE's unweighted masked mean). The mean is >= 1/n whenever an
    # image has a masked patch; the clamp only turns 0/0 into 0 for images without any.
    w = e / (e.sum(dim=1, keepdim=True) / n.clamp_min(1.0)).clamp_min(torch.finfo(e.dtype).tiny)
    return w * masked.to(w.dtype)


def weighted_masked_mean(loss: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(w * loss * mask) / sum(mask)`` for ``N x L`` tensors: with all weights 1 on masked
    patches this is exactly MAE's masked mean."""
    return (loss * weights * mask).sum() / mask.sum()


def default_dds_depths(depth: int) -> tuple[int, ...]:
    """Ends of the three thirds of the encoder: 12 -> (4, 8, 12), 24 -> (8, 16, 24), 4 -> (1, 3, 4)."""
    return tuple(sorted({round(depth * i / 3) for i in (1, 2, 3)} - {0}))


def check_depths(name: str, depths: Sequence[int], depth: int, need_last: bool) -> tuple[int, ...]:
    """Sorted unique block counts in ``1..depth`` (must include ``depth`` when ``need_last``)."""
    try:
        ds = tuple(sorted({int(d) for d in depths}))
    except (TypeError, ValueError):
        raise MimbenchError(f"{name} must be a list of block counts, got {depths!r}.") from None
    if not ds or ds[0] < 1 or ds[-1] > depth:
        raise MimbenchError(f"{name}={depths!r} must list depths between 1 and depth={depth}.")
    if need_last and ds[-1] != depth:
        raise MimbenchError(
            f"{name}={depths!r} must include the last depth {depth}.",
            "The last layer's prediction is the model's output, and blocks after the deepest "
            "supervised depth would get no gradient.",
        )
    return ds


def check_dds_args(depth: int, dds_depths, dds_weights, dds_distance_metric: str, dds_distance_norm: str,
                   dds_beta_reg: float) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Validate the DDS knobs every consumer shares; returns ``(depths, weights)``
    (``None`` depths = :func:`default_dds_depths`, ``None`` weights = all 1)."""
    depths = check_depths("dds_depths", default_dds_depths(depth) if dds_depths is None else dds_depths, depth, True)
    if dds_weights is None:
        dds_weights = [1.0] * len(depths)
    if len(dds_weights) != len(depths) or any(float(w) < 0 for w in dds_weights):
        raise MimbenchError(
            f"dds_weights={dds_weights!r} must give one non-negative weight per supervised depth {depths}."
        )
    if dds_distance_metric not in DISTANCE_METRICS:
        raise MimbenchError(
            f"Unknown dds_distance_metric {dds_distance_metric!r}.", f"Use one of: {', '.join(DISTANCE_METRICS)}."
        )
    if dds_distance_norm not in DISTANCE_NORMALIZATIONS:
        raise MimbenchError(
            f"Unknown dds_distance_norm {dds_distance_norm!r}.", f"Use one of: {', '.join(DISTANCE_NORMALIZATIONS)}."
        )
    if float(dds_beta_reg) < 0:
        raise MimbenchError(f"dds_beta_reg must be >= 0, got {dds_beta_reg!r}.")
    return depths, tuple(float(w) for w in dds_weights)


class DDSObjective(NamedTuple):
    """Result of :func:`deep_dynamic_supervision`."""

    total: torch.Tensor  # scalar: sum_k depth_weights[k] * losses[k]
    losses: list[torch.Tensor]  # per supervised depth, scalar weighted masked means
    weights: list[torch.Tensor]  # per supervised depth, N x L dynamic weights (0 on visible patches)
    distance: torch.Tensor  # N x L distance map (no gradient)


def deep_dynamic_supervision(
    per_patch_losses: Sequence[torch.Tensor],
    mask: torch.Tensor,
    grid_size: int | Sequence[int],
    betas: torch.Tensor,
    depth_weights: Sequence[float],
    metric: str = "euclidean",
    normalize: str = "max",
) -> DDSObjective:
    """The DDS objective shared by every consumer (MAE+DDS, DDAE, BEiT v2+DDS).

    Args:
        per_patch_losses: one ``N x L`` per-patch loss per supervised depth (shallow to deep):
            pixel MSE for the MAE family, token cross-entropy for BEiT v2; values at visible
            patches are ignored.
        mask: ``N x L`` (1 = masked); every image must keep a visible patch (callers check).
        grid_size: patch grid ``G`` or ``(H, W)``.
        betas: one beta per depth (:class:`DynamicBeta`'s output).
        depth_weights: loss weight per depth.
        metric, normalize: :func:`distance_map` options.

    Returns:
        :class:`DDSObjective`; ``losses[k] = sum(w_k * loss_k * mask) / sum(mask)`` with
        ``w_k = dynamic_weights(distance, mask, betas[k])``, ``total = sum_k depth_weights[k] * losses[k]``.
    """
    if len(per_patch_losses) != len(depth_weights) or len(per_patch_losses) != betas.shape[0]:
        raise MimbenchError(
            f"DDS got {len(per_patch_losses)} per-depth losses, {len(depth_weights)} depth weights and "
            f"{betas.shape[0]} betas; they must agree."
        )
    with torch.no_grad():
        dist = distance_map(mask, grid_size, metric, normalize, check=False)
    weights = [dynamic_weights(dist, mask, betas[k]) for k in range(len(per_patch_losses))]
    losses = [weighted_masked_mean(loss, weights[k], mask) for k, loss in enumerate(per_patch_losses)]
    total = losses[0] * float(depth_weights[0])
    for k in range(1, len(losses)):
        total = total + losses[k] * float(depth_weights[k])
    return DDSObjective(total, losses, weights, dist)


def schedule_value(progress: float, start: float, end: float, kind: str = "cosine") -> float:
    """Interpolate ``start -> end`` at ``progress`` in [0, 1] (clamped), linearly or by half-cosine."""
    p = min(max(float(progress), 0.0), 1.0)
    s = p if kind == "linear" else (1.0 - math.cos(math.pi * p)) / 2.0
    return start + (end - start) * s


class DynamicBeta(nn.Module):
    """Beta of each supervised depth (see the module docstring for the modes).

    Args:
        num_depths: how many depths are supervised (one beta each).
        mode: ``"scheduled"``, ``"learnable"`` or ``"fixed"``.
        beta_start, beta_end: schedule end points (``beta_end`` unused by ``"fixed"``).
        schedule: ``"linear"`` or ``"cosine"``.
        bound: largest ``|offset|`` of the learnable part (``"learnable"`` only), > 0.
        persistent_progress: keep training progress in the state dict (so a resumed run gets the
            right beta from its first step); off for the MAE plug-in, whose state dict must stay
            MAE's - there :meth:`set_progress` restores it at the first ``on_step_end``.

    ``forward()`` returns the ``num_depths`` betas (a tensor; differentiable in ``"learnable"``).
    ``theta`` (``num_depths``, init 0) exists only in ``"learnable"`` mode.
    """

    def __init__(
        self,
        num_depths: int,
        mode: str = "learnable",
        beta_start: float = -1.0,
        beta_end: float = 1.0,
        schedule: str = "cosine",
        bound: float = 0.5,
        persistent_progress: bool = True,
    ) -> None:
        super().__init__()
        if mode not in BETA_MODES:
            raise MimbenchError(f"Unknown dds_beta_mode {mode!r}.", f"Use one of: {', '.join(BETA_MODES)}.")
        if schedule not in BETA_SCHEDULES:
            raise MimbenchError(
                f"Unknown dds_beta_schedule {schedule!r}.", f"Use one of: {', '.join(BETA_SCHEDULES)}."
            )
        if mode == "learnable" and not float(bound) > 0:
            raise MimbenchError(f"dds_beta_bound must be > 0 for learnable beta, got {bound!r}.")
        if num_depths < 1:
            raise MimbenchError(f"At least one supervised depth is needed, got {num_depths}.")
        self.num_depths = int(num_depths)
        self.mode = mode
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.schedule = schedule
        self.bound = float(bound)
        self.register_buffer("progress", torch.zeros(()), persistent=persistent_progress)
        self.theta = nn.Parameter(torch.zeros(num_depths)) if mode == "learnable" else None

    def extra_repr(self) -> str:
        return (
            f"num_depths={self.num_depths}, mode={self.mode!r}, beta_start={self.beta_start}, "
            f"beta_end={self.beta_end}, schedule={self.schedule!r}, bound={self.bound}"
        )

    def set_progress(self, progress: float) -> None:
        """Set training progress (0 = first step, 1 = end), clamped to [0, 1]."""
        self.progress.fill_(min(max(float(progress), 0.0), 1.0))

    def scheduled(self) -> float:
        """The scheduled (offset-free) beta at the current progress."""
        if self.mode == "fixed":
            return self.beta_start
        return schedule_value(float(self.progress), self.beta_start, self.beta_end, self.schedule)

    def offset(self) -> torch.Tensor | None:
        """``bound * tanh(theta)`` (``num_depths``) in learnable mode, else ``None``."""
        return None if self.theta is None else self.bound * torch.tanh(self.theta)

    def forward(self) -> torch.Tensor:
        # Tensor arithmetic on the progress buffer: no host-device synchronisation per step.
        if self.mode == "fixed":
            base = torch.full((self.num_depths,), self.beta_start, device=self.progress.device)
        else:
            p = self.progress.clamp(0.0, 1.0)
            s = p if self.schedule == "linear" else (1.0 - torch.cos(math.pi * p)) / 2.0
            base = (self.beta_start + (self.beta_end - self.beta_start) * s).expand(self.num_depths)
        off = self.offset()
        return base if off is None else base + off

    def regularizer(self) -> torch.Tensor:
        """``sum_k offset_k**2`` (0 unless learnable); the model scales it by ``dds_beta_reg``."""
        off = self.offset()
        return self.progress.new_zeros(()) if off is None else (off**2).sum()


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """Per-token feature distance ``N x K x D`` pair -> ``N x K``: ``"smooth_l1"`` (beta 1, mean
    over channels), ``"mse"`` (mean over channels) or ``"cosine"`` (1 - cosine similarity)."""
    if kind == "smooth_l1":
        return F.smooth_l1_loss(student, teacher, reduction="none", beta=1.0).mean(-1)
    if kind == "mse":
        return ((student - teacher) ** 2).mean(-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    raise MimbenchError(f"Unknown distill_loss {kind!r}.", "Use one of: smooth_l1, mse, cosine.")


def ema_momentum(progress: float, base: float = 0.996, final: float = 1.0) -> float:
    """Teacher momentum at ``progress`` in [0, 1]: ``final - (final - base) * (1 + cos(pi p)) / 2``
    (BYOL's cosine increase from ``base`` to ``final``)."""
    p = min(max(float(progress), 0.0), 1.0)
    return final - (final - base) * (1.0 + math.cos(math.pi * p)) / 2.0


class DDSBetaSchedule:
    """The per-step part every DDS consumer shares (MAE + DDS, BEiT v2 + DDS): the model holds a
    :class:`DynamicBeta` as ``self.dds_beta``; put this class before the model's base class."""

    dds_beta: DynamicBeta

    def on_step_end(self, it: int, total_its: int) -> None:
        """Advance the beta schedule: progress ``(it + 1) / total_its`` for the next step."""
        self.dds_beta.set_progress((it + 1) / max(int(total_its), 1))

    def set_progress(self, next_it: int, total_its: int) -> None:
        """Put the beta schedule where it is before step ``next_it`` (e.g. when resuming)."""
        self.dds_beta.set_progress(next_it / max(int(total_its), 1))

    def no_weight_decay(self) -> set[str]:
        names = super().no_weight_decay()
        if self.dds_beta.theta is not None:
            names.add("dds_beta.theta")
        return names
