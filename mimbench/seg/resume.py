"""Exact resume of segmentation training: every RNG state travels in mmengine's checkpoints.

mmengine checkpoints hold model, optimizer, schedulers, the message hub and the iteration, but no
random-number state. On resume ``IterBasedTrainLoop`` re-seeds, then advances the data iterator by
the finished iterations (re-reading those batches, so an infinite sampler is back at the same
position), and continues - with the global RNG streams wherever seeding and the advance left them,
so dropout, drop path and the random crops/flips of later batches differ from an uninterrupted run.

:class:`RngStateHook` saves :func:`mimbench.rng.rng_state` (Python, NumPy, torch CPU and CUDA;
tensors and primitives only, so the checkpoint still loads weights-only) in ``meta`` of every
checkpoint and, on resume, restores it right after the advance and before the next batch is read.
With ``num_workers=0`` (the pipeline runs in the main process) a run killed at any iteration and
resumed from its last checkpoint then ends bit-identical on CPU to an uninterrupted one.
"""
from __future__ import annotations

from mmengine.hooks import Hook
from mmseg.registry import HOOKS

from mimbench.rng import rng_state, set_rng_state

META_KEY = "mimbench_rng_state"


class _RestoreBeforeBatch:
    """Wraps the loop's data iterator: after ``skip`` batches (mmengine's advance) it restores ``state``."""

    def __init__(self, inner, skip: int, state):
        self._inner, self._skip, self._state = inner, int(skip), state

    def __iter__(self):
        return self

    def __next__(self):
        if self._skip > 0:
            self._skip -= 1
        elif self._state is not None:
            set_rng_state(self._state)
            self._state = None
        return next(self._inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@HOOKS.register_module()
class RngStateHook(Hook):
    """Save all RNG states with each checkpoint; restore them when training resumes from one."""

    def __init__(self):
        self._pending = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint.setdefault("meta", {})[META_KEY] = rng_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._pending = checkpoint.get("meta", {}).get(META_KEY)

    def before_train(self, runner) -> None:
        loop = runner.train_loop
        if self._pending is not None and hasattr(loop, "dataloader_iterator"):
            loop.dataloader_iterator = _RestoreBeforeBatch(loop.dataloader_iterator, loop.iter, self._pending)
        self._pending = None
