"""Stop segmentation training at the first non-finite loss, before it reaches a checkpoint.

mmengine trains on whatever the loss is: a NaN or inf spreads into the weights, and the next
``CheckpointHook`` saves them over the last good state. :class:`NonFiniteLossHook` looks at the
iteration's loss terms (``log_vars``, already on the host for logging) right after the optimizer
step and, when any is non-finite, raises a :class:`MimbenchError` naming the iteration and every
term. It runs before the checkpoint hook, so the newest ``iter_N.pth`` is the last good state and
``--resume`` continues from it.
"""
from __future__ import annotations

import math

from mmengine.hooks import Hook
from mmseg.registry import HOOKS

from mimbench.errors import MimbenchError


def _value(v) -> float:
    return float(v.item()) if hasattr(v, "item") else float(v)


@HOOKS.register_module()
class NonFiniteLossHook(Hook):
    """Raise MimbenchError at the first iteration whose loss terms are not all finite."""

    priority = "ABOVE_NORMAL"  # before CheckpointHook (VERY_LOW) and LoggerHook (BELOW_NORMAL)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        terms = {k: _value(v) for k, v in (outputs or {}).items()}
        if all(math.isfinite(v) for v in terms.values()):
            return
        shown = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
        raise MimbenchError(
            f"The segmentation loss became non-finite at iteration {batch_idx + 1}; loss terms: {shown}.",
            f"Training stopped before saving that iteration; the newest checkpoint in {runner.work_dir} is the last "
            "good state. Lower the learning rate (optim_wrapper.optimizer.lr) or enable gradient clipping "
            "(optim_wrapper.clip_grad), then --resume.")
