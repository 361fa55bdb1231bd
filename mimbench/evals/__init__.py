"""Evaluations of an encoder file: k-NN, linear probe, fine-tuning (and segmentation, in ``segment``).

``run_eval`` dispatches by task name; each task module is imported only when used, so that the
mmseg stack behind ``segment`` is never loaded for a classification evaluation.
"""
from __future__ import annotations

from importlib import import_module
from pathlib import Path

from mimbench.errors import MimbenchError

#: task name -> (module, function). Every function takes the keyword arguments of ``run_eval``.
TASKS = {
    "knn": ("mimbench.evals.knn", "run_knn"),
    "linear": ("mimbench.evals.linear", "run_linear"),
    "finetune": ("mimbench.evals.finetune", "run_finetune"),
    "segment": ("mimbench.evals.segment", "run_segment"),
}


def run_eval(task: str, *, encoder: Path, config: Path, data: str, out: Path, overrides: list[str] = (),
             resume: bool = False, layout: str = "auto", **options) -> dict:
    """Run evaluation ``task`` of ``encoder`` with protocol ``config`` on ``data``; write and return its record.

    The record (``mimbench.results.records`` schema) is also written into ``out``; ``record["metrics"]``
    holds the accuracies in percent (segmentation: aAcc / mIoU / mAcc). ``layout`` is the checkpoint
    layout of ``encoder`` (``--from``; "auto" detects it). ``options`` are passed on to the task
    (``segment``: ``launcher``, ``aug_test``).
    """
    if task not in TASKS:
        raise MimbenchError(f"Unknown evaluation task {task!r}.", f"Use one of {', '.join(sorted(TASKS))}.")
    module_name, func_name = TASKS[task]
    try:
        module = import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise MimbenchError(f"The {task} evaluation is not available in this installation.",
                            "Use one of the available tasks.") from err
    func = getattr(module, func_name)
    return func(encoder=Path(encoder), config=Path(config), data=str(data), out=Path(out),
                overrides=list(overrides or []), resume=bool(resume), layout=str(layout), **options)
