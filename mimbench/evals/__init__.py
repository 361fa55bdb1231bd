"""Evaluations of an encoder file: k-NN, linear probe, fine-tuning, segmentation (the table: ``tasks``).

``run_eval`` dispatches by task name through :data:`mimbench.evals.tasks.TASKS`; each task module is imported
only when used, so that the mmseg stack behind ``segment`` is never loaded for a classification evaluation.
"""
from __future__ import annotations

from pathlib import Path

from mimbench.evals.tasks import TASKS, get_task, resolve


def run_eval(task: str, *, encoder: Path, config: Path, data: str, out: Path, overrides: list[str] = (),
             resume: bool = False, layout: str = "auto", **options) -> dict:
    """Run evaluation ``task`` of ``encoder`` with protocol ``config`` on ``data``; write and return its record.

    The record (``mimbench.results.records`` schema) is also written into ``out``; ``record["metrics"]``
    holds the accuracies in percent (segmentation: aAcc / mIoU / mAcc). ``layout`` is the checkpoint layout
    of ``encoder`` (``auto``: detected); ``options`` are the task's extra keywords (its entry's ``options``,
    e.g. ``segment``: ``launcher``, ``aug_test``).
    """
    entry = get_task(task)
    func = resolve(entry.runner, task)
    return func(encoder=Path(encoder), config=Path(config), data=str(data), out=Path(out),
                overrides=list(overrides or []), resume=bool(resume), layout=str(layout), **options)


__all__ = ["TASKS", "run_eval"]
