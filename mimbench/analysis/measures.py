"""Representation measures of per-layer features: linear CKA and RankMe.

Linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019, Eq. for
the linear kernel): for features X (N×D1) and Y (N×D2) of the same N images, each column centred,
``CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)``; 1 for identical representations (and for any
orthogonal transform or isotropic scaling of one), 0 when no linear relation is shared. Computed in float64.

RankMe (Garrido et al., "RankMe: Assessing the downstream performance of pretrained self-supervised
representations by their rank", ICML 2023, Eq. 1): with ``sigma_k`` the singular values of the embedding
matrix Z (N×D, not centred), ``p_k = sigma_k / ||sigma||_1 + eps`` and
``RankMe(Z) = exp(-sum_k p_k log p_k)``, ``eps = 1e-7`` (:data:`RANKME_EPS`, the paper's). It is a smooth
effective rank: min(N, D) for a flat spectrum, 1 for a rank-one matrix (up to eps).

Both are computed with numpy's LAPACK in float64: ``torch.linalg.svdvals`` on the CPU was seen to stall after
cyanure's logistic regression had run in the same process (the demo runs low-shot before the analysis).
"""
from __future__ import annotations

import numpy as np
import torch

from mimbench.errors import MimbenchError

#: The epsilon of Garrido et al. 2023 (Eq. 1) added to every normalised singular value.
RANKME_EPS = 1e-7


def _matrix(x, what: str) -> np.ndarray:
    t = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float64)
    if t.ndim != 2 or t.shape[0] < 2:
        raise MimbenchError(f"{what} must be an N×D matrix with N >= 2, got shape {tuple(t.shape)}.",
                            "Use at least two images.")
    return t


def linear_cka(x, y) -> float:
    """Linear CKA of features ``x`` (N×D1) and ``y`` (N×D2) of the same images (see the module docstring)."""
    x, y = _matrix(x, "x"), _matrix(y, "y")
    if x.shape[0] != y.shape[0]:
        raise MimbenchError(f"CKA needs the features of the same images: {x.shape[0]} vs {y.shape[0]} rows.",
                            "Compute both on the same subset.")
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / norm) if norm > 0 else 0.0


def cka_matrix(layers_a, layers_b) -> np.ndarray:
    """``len(layers_a)`` × ``len(layers_b)`` linear CKA between every layer of one list of per-layer features and
    every layer of another (the same list: an encoder's own heat map; two encoders of any depths: every pair of
    the layers they have)."""
    return np.array([[linear_cka(a, b) for b in layers_b] for a in layers_a], dtype=np.float64)


def rankme(z, eps: float = RANKME_EPS) -> float:
    """RankMe of the embedding matrix ``z`` (N×D): ``exp(-sum_k p_k log p_k)``, ``p_k = sigma_k / ||sigma||_1 +
    eps`` over its min(N, D) singular values (Garrido et al. 2023, Eq. 1)."""
    sigma = np.linalg.svd(_matrix(z, "z"), compute_uv=False)
    total = sigma.sum()
    if total == 0.0:
        raise MimbenchError("RankMe of an all-zero embedding matrix is undefined.", "Check the features.")
    p = sigma / total + eps
    return float(np.exp(-(p * np.log(p)).sum()))


__all__ = ["RANKME_EPS", "cka_matrix", "linear_cka", "rankme"]
