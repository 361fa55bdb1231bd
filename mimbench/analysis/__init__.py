"""Analysis of what pre-training did to an encoder's representation (``mimbench analyze``).

:func:`attention_distance` and :func:`attention_entropy` (per block and head, from hooks on timm's attention
modules), :func:`linear_cka` / :func:`cka_matrix` and :func:`rankme` on per-layer features, and
:func:`run_analyze`, the command's record and figures. See docs/analysis.md.
"""
from __future__ import annotations

from mimbench.analysis.attention import AttentionUnreadable, attention_distance, attention_entropy, attention_measures
from mimbench.analysis.measures import cka_matrix, linear_cka, rankme
from mimbench.analysis.run import run_analyze

__all__ = ["AttentionUnreadable", "attention_distance", "attention_entropy", "attention_measures", "cka_matrix",
           "linear_cka", "rankme", "run_analyze"]
