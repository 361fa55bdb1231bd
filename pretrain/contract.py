"""The per-step part of the pre-training model contract that :mod:`pretrain.main` uses, written once.

A model's ``forward`` stores its detached loss terms in ``self._loss_terms`` (``dict[str, Tensor]``);
``loss_terms`` converts them to floats only when the log asks (no device sync per step), and
``on_step_end(it, total_its)`` is where a model advances a per-step schedule (nothing by default).
"""
from __future__ import annotations


class StepContract:
    """Mixin for pre-training models (put it before ``nn.Module`` in the bases)."""

    _loss_terms: dict

    @property
    def loss_terms(self) -> dict[str, float]:
        """Per-term losses of the last forward as floats."""
        return {k: float(v) for k, v in self._loss_terms.items()}

    def on_step_end(self, it: int, total_its: int) -> None:
        """Called after every optimizer step; nothing is scheduled per step unless a model overrides it."""
        return None
