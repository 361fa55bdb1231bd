"""Stop segmentation training at the first non-finite loss, on every rank, before it reaches a checkpoint.

mmengine trains on whatever the loss is: a NaN or inf spreads into the weights, and the next
``CheckpointHook`` saves them over the last good state. :class:`NonFiniteLossHook` looks at the
iteration's loss terms (``log_vars``, already on the host for logging) right after the optimizer
step and, when any is non-finite on any rank, raises a :class:`MimbenchError` naming the iteration and
this rank's terms. The decision is collective (a one-element all-reduce of "mine is not finite" when
several processes train): each rank sees only its own batch's loss - with fp16 AMP (the ADE20K configs)
one rank's overflow need not show on another - and a rank that stopped alone would leave the others
waiting in the next gradient all-reduce. It runs before the checkpoint hook, so the newest
``iter_N.pth`` is the last good state and ``--resume`` continues from it.
"""
from __future__ import annotations

import math

import torch
from mmengine.hooks import Hook
from mmseg.registry import HOOKS

from mimbench import dist
from mimbench.errors import MimbenchError


def _value(v) -> float:
    return float(v.item()) if hasattr(v, "item") else float(v)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (one all-reduce when several processes run)."""
    ctx = dist.context()
    if not ctx.distributed:
        return bool(flag)
    return bool(dist.all_sum(torch.tensor([float(flag)], device=ctx.device)).item() > 0)


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Raise MimbenchError, on every rank, at the first iteration whose loss terms are not all finite on some rank."""

    priority = "ABOVE_NORMAL"  # before CheckpointHook (VERY_LOW) and LoggerHook (BELOW_NORMAL)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        terms = {k: _value(v) for k, v in (outputs or {}).items()}
        mine = not all(math.isfinite(v) for v in terms.values())
        if not any_rank(mine):
            return
        shown = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
        where = "" if mine else " on another process (this one's terms are finite)"
        raise MimbenchError(
            f"The segmentation loss became non-finite at iteration {batch_idx + 1}{where}; loss terms: {shown}.",
            f"Training stopped before saving that iteration; the newest checkpoint in {runner.work_dir} is the last "
            "good state. Lower the learning rate (optim_wrapper.optimizer.lr) or enable gradient clipping "
            "(optim_wrapper.clip_grad), then --resume.")
