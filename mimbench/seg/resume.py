"""Exact resume of segmentation training: every rank's RNG state travels in mmengine's checkpoints.

mmengine checkpoints hold model, optimizer, schedulers, the message hub and the iteration, but no
random-number state. On resume ``IterBasedTrainLoop`` re-seeds, then advances the data iterator by
the finished iterations (re-reading those batches, so an infinite sampler is back at the same
position), and continues - with the global RNG streams wherever seeding and the advance left them,
so dropout, drop path and the random crops/flips of later batches differ from an uninterrupted run.

:class:`RngStateHook` stores every rank's :func:`mimbench.rng.rng_state` (Python, NumPy, torch CPU and
CUDA; tensors and primitives only, so the checkpoint still loads weights-only) in ``meta`` of every
checkpoint, as a list indexed by rank. mmengine writes checkpoints on rank 0 only
(``before_save_checkpoint`` runs there alone), so the states are gathered earlier, in
``after_train_iter`` of each iteration a ``CheckpointHook`` is about to save - a point every rank
reaches - with :func:`mimbench.rng.rank_states` (one collective). On resume each rank gets its own
entry back (:func:`mimbench.rng.restore_rank_state`; a rank the checkpoint has no entry for, e.g. one
written by fewer processes, is re-seeded from (seed, rank, iteration)) right after mmengine's advance
and before the next batch is read. The states may arrive on the GPU (mmengine's resume loads with
``map_location='cuda'``): the restore moves them to the CPU first. With ``num_workers=0`` (the
pipeline runs in the main process) a run killed at any iteration and resumed from its last
checkpoint then ends bit-identical on CPU to an uninterrupted one.
"""
from __future__ import annotations

import functools

from mmengine.hooks import CheckpointHook, Hook
from mmseg.registry import HOOKS

from mimbench.rng import rank_states, restore_rank_state, rng_state

META_KEY = "mimbench_rng_state"


class _RestoreBeforeBatch:
    """Wraps the loop's data iterator: after ``skip`` batches (mmengine's advance) it calls ``restore``."""

    def __init__(self, inner, skip: int, restore):
        self._inner, self._skip, self._restore = inner, int(skip), restore

    def __iter__(self):
        return self

    def __next__(self):
        if self._skip > 0:
            self._skip -= 1
        elif self._restore is not None:
            self._restore()
            self._restore = None
        return next(self._inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def checkpoint_due(runner) -> bool:
    """Whether a ``CheckpointHook`` of ``runner`` saves at the end of this iteration (its own rule, iteration-based)."""
    return any(isinstance(h, CheckpointHook) and not h.by_epoch
               and (h.every_n_train_iters(runner, h.interval, h.save_begin)
                    or (h.save_last and h.is_last_train_iter(runner)))
               for h in runner.hooks)


@HOOKS.register_module()
class RngStateHook(Hook):
    """Save every rank's RNG states with each checkpoint; give each rank its own back when training resumes."""

    def __init__(self):
        self._pending = None
        self._gathered = None  # (iteration, rank_states()) taken on every rank before a checkpoint

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if checkpoint_due(runner):  # the same answer on every rank: all of them join the gather
            self._gathered = (runner.iter, rank_states())

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self._gathered is not None and self._gathered[0] == runner.iter:
            states = self._gathered[1]
        else:  # a save outside the iteration hooks reaches rank 0 alone: its states only (other ranks re-seed)
            states = [rng_state()]
        checkpoint.setdefault("meta", {})[META_KEY] = states

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._pending = (checkpoint.get("meta") or {}).get(META_KEY)

    def before_train(self, runner) -> None:
        loop = runner.train_loop
        if self._pending is not None and hasattr(loop, "dataloader_iterator"):
            restore = functools.partial(restore_rank_state, self._pending, rank=runner.rank, seed=runner.seed,
                                        step=loop.iter)
            loop.dataloader_iterator = _RestoreBeforeBatch(loop.dataloader_iterator, loop.iter, restore)
        self._pending = None
