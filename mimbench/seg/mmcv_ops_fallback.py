"""Pure-PyTorch stand-in for ``mmcv.ops`` when only ``mmcv-lite`` is installed.

mmsegmentation 1.2.2 imports ``mmcv.ops`` at module import time in a few places
(``point_sample`` for the mask-classification and point-rend helpers,
``sigmoid_focal_loss`` for the focal loss). ``mmcv-lite`` ships the Python files
of ``mmcv.ops`` but not the compiled ``mmcv._ext`` they load, so ``import
mmseg.models`` fails even though the UperNet/ViT path never calls a compiled op.

:func:`install` registers a small module under the name ``mmcv.ops`` -- only when
importing the real one fails -- that implements the two ops above with the same
semantics as mmcv's kernels, and answers every other name with a placeholder
class that raises :class:`~mimbench.errors.MimbenchError` when called or
instantiated (so ``from mmcv.ops import DeformConv2d`` still imports, and using
it names the missing dependency). Dunder look-ups raise ``AttributeError`` so
that ``hasattr``/``inspect``/pickling keep working.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch
import torch.nn.functional as F

from mimbench.errors import MimbenchError

#: Names this module implements itself; everything else becomes a placeholder.
IMPLEMENTED = ("point_sample", "sigmoid_focal_loss")


def point_sample(input: torch.Tensor, points: torch.Tensor, align_corners: bool = False, **kwargs) -> torch.Tensor:
    """Bilinearly sample ``input`` at normalised points, as ``mmcv.ops.point_sample``.

    Args:
        input: feature map, N x C x H x W.
        points: N x P x 2 or N x Hp x Wp x 2, (x, y) in [0, 1] relative to the
            image (0 = left/top edge, 1 = right/bottom edge).
        align_corners: passed to :func:`torch.nn.functional.grid_sample`
            (mmcv's default is False).
        **kwargs: further ``grid_sample`` arguments (``mode``, ``padding_mode``).

    Returns:
        N x C x P for 3-D ``points``, N x C x Hp x Wp for 4-D ``points``.
    """
    squeeze = points.dim() == 3
    if squeeze:
        points = points.unsqueeze(2)
    # grid_sample works in [-1, 1]; mmcv's points are in [0, 1].
    out = F.grid_sample(input, 2.0 * points - 1.0, align_corners=align_corners, **kwargs)
    return out.squeeze(3) if squeeze else out


def sigmoid_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: float = 0.25,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Sigmoid focal loss with the semantics of ``mmcv.ops.sigmoid_focal_loss``.

    For logits ``x`` (N x C) and integer targets ``t`` (N), with ``p = sigmoid(x)``:
    the entry (n, c) is ``-alpha (1-p)^gamma log p`` when ``t[n] == c`` and
    ``-(1-alpha) p^gamma log(1-p)`` otherwise, so a target outside ``[0, C)``
    (e.g. ``C``, the background index of detection heads) makes every class
    negative. ``weight`` (C,) multiplies row n by ``weight[t[n]]`` as in the kernel.
    ``reduction``: ``"none"`` -> N x C, ``"sum"``, or ``"mean"`` = sum / N (mmcv
    divides by the number of rows, not entries).
    """
    if input.dim() != 2 or target.dim() != 1 or input.size(0) != target.size(0):
        raise MimbenchError(
            f"sigmoid_focal_loss expects logits N x C and targets N, got {tuple(input.shape)} and {tuple(target.shape)}.",
            "Flatten the spatial dimensions into N before calling it.",
        )
    if reduction not in ("none", "mean", "sum"):
        raise MimbenchError(f"Unknown reduction {reduction!r}.", "Use 'none', 'mean' or 'sum'.")
    num_classes = input.size(1)
    classes = torch.arange(num_classes, device=input.device)
    positive = (target.long().unsqueeze(1) == classes).to(input.dtype)
    # logsigmoid is the numerically stable log p; log(1-p) = logsigmoid(-x).
    p = input.sigmoid()
    loss = -alpha * positive * (1 - p).pow(gamma) * F.logsigmoid(input) - (1 - alpha) * (1 - positive) * p.pow(
        gamma
    ) * F.logsigmoid(-input)
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != num_classes:
            raise MimbenchError(
                f"sigmoid_focal_loss weight must have one entry per class ({num_classes}), got {tuple(weight.shape)}.",
                "Pass a 1-D class-weight tensor.",
            )
        valid = (target >= 0) & (target < num_classes)
        row_weight = torch.ones_like(target, dtype=input.dtype)
        row_weight[valid] = weight.to(input.dtype)[target[valid].long()]
        loss = loss * row_weight.unsqueeze(1)
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / input.size(0) if reduction == "mean" else total


def _placeholder(name: str) -> type:
    """A class standing for ``mmcv.ops.<name>``: importable and subclassable, fails when used."""

    def refuse(cls, *args, **kwargs):
        raise MimbenchError(
            f"mmcv.ops.{name} needs full mmcv with compiled ops; only mmcv-lite (no compiled ops) is installed.",
            "Install the full mmcv build matching your torch/CUDA (pip install mmcv, see the mmcv install guide) "
            "or choose a model that does not use this op.",
        )

    return type(name, (), {"__new__": refuse, "__module__": "mmcv.ops", "__doc__": f"Unavailable mmcv.ops.{name}."})


class _FallbackOps(types.ModuleType):
    """Module object whose unknown attributes are placeholders (dunders stay AttributeError)."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = _placeholder(name)
        setattr(self, name, value)
        return value


def build_module() -> types.ModuleType:
    """Create (without registering) the fallback ``mmcv.ops`` module."""
    module = _FallbackOps("mmcv.ops", __doc__)
    module.point_sample = point_sample
    module.sigmoid_focal_loss = sigmoid_focal_loss
    module.__all__ = list(IMPLEMENTED)
    module.MIMBENCH_FALLBACK = True
    return module


def install() -> bool:
    """Register the fallback as ``mmcv.ops`` if the real one cannot be imported.

    Returns True when the fallback is (now or already) in place, False when the
    real compiled ``mmcv.ops`` is importable and was left alone.
    """
    current = sys.modules.get("mmcv.ops")
    if current is not None:
        return bool(getattr(current, "MIMBENCH_FALLBACK", False))
    try:
        importlib.import_module("mmcv.ops")
        return False
    except ImportError:
        pass
    # A failed package import can leave half-initialised submodules behind.
    for key in [k for k in sys.modules if k.startswith("mmcv.ops.")]:
        del sys.modules[key]
    import mmcv

    module = build_module()
    sys.modules["mmcv.ops"] = module
    mmcv.ops = module
    return True
