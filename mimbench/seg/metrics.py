"""mmseg's ``IoUMetric`` with the per-class IoU returned, not only printed.

mmseg computes IoU per class and prints it as a table, but returns only the summary (aAcc, mIoU,
mAcc). The run record needs the per-class values (the report draws them), so this subclass adds
``IoU.<class name>`` entries, in percent like mmseg's, computed from the same accumulated areas.
Classes absent from both the ground truth and the predictions have no IoU (mmseg's NaN, which its
mean skips) and get no entry. The summary values are mmseg's own, unchanged.
"""
from __future__ import annotations

from mmseg.evaluation import IoUMetric
from mmseg.registry import METRICS

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
