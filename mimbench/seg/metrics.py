"""mmseg's ``IoUMetric`` with the per-class IoU returned, not only printed.

mmseg computes IoU per class and prints it as a table, but returns only the summary (aAcc, mIoU,
mAcc). The run record needs the per-class values (the report draws them), so this subclass adds
``IoU.<class name>`` entries, in percent like mmseg's, computed from the same accumulated areas.
Classes absent from both the ground truth and the predictions have no IoU (mmseg's NaN, which its
mean skips) and get no entry. The summary values are mmseg's own, unchanged.

:class:`FinalValidationHook` keeps the metrics of the validation mmengine runs after the last training
iteration. The segmentation runner defines the validation data and metric as the test's
(:func:`mimbench.evals.segment.share_eval_data`), with the same precision, and mmengine's ``val_step`` and
``test_step`` are the same prediction, so those metrics are the test's: the runner reports them instead of
evaluating the same model on the same images a second time.
"""
from __future__ import annotations

from mmengine.hooks import Hook
from mmseg.evaluation import IoUMetric
from mmseg.registry import HOOKS, METRICS

PER_CLASS_KEY = "IoU."


@METRICS.register_module()
class PerClassIoUMetric(IoUMetric):
    """``IoUMetric`` whose result also holds ``IoU.<class>`` for every class that occurs."""

    def compute_metrics(self, results: list) -> dict:
        metrics = super().compute_metrics(results)
        if self.format_only or not results:
            return metrics
        intersect = sum(r[0] for r in results).double()
        union = sum(r[1] for r in results).double()
        for name, inter, uni in zip(self.dataset_meta["classes"], intersect.tolist(), union.tolist()):
            if uni > 0:
                metrics[f"{PER_CLASS_KEY}{name}"] = round(100.0 * inter / uni, 2)
        return metrics


def split_per_class(metrics: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(summary metrics, per-class IoU by class name) from a ``PerClassIoUMetric`` result."""
    summary, per_class = {}, {}
    for key, value in metrics.items():
        if key.startswith(PER_CLASS_KEY):
            per_class[key[len(PER_CLASS_KEY):]] = float(value)
        else:
            summary[key] = value
    return summary, per_class


@HOOKS.register_module()
class FinalValidationHook(Hook):
    """Remember each validation's metrics and the iteration they were taken at."""

    def __init__(self):
        self.metrics, self.at_iter = None, None

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.metrics, self.at_iter = dict(metrics or {}), runner.iter

    @staticmethod
    def metrics_of(runner) -> dict | None:
        """The metrics of the validation of the fully trained model (None when none ran after the last iteration)."""
        for hook in runner.hooks:
            if isinstance(hook, FinalValidationHook) and hook.metrics is not None \
                    and hook.at_iter == runner.iter == runner.max_iters:
                return hook.metrics
        return None
