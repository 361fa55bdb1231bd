"""Linear CKA and RankMe against their definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mimbench.analysis import cka_matrix, linear_cka, rankme
from mimbench.analysis.measures import RANKME_EPS
from mimbench.analysis.run import block_features, subset_images, subset_indices
from mimbench.errors import MimbenchError


def test_cka_of_an_encoder_with_itself_is_one_per_layer(tiny_encoder):
    images = subset_images("builtin:fashion-mnist", 32, subset_indices(2000, 30, seed=0))
    layers = block_features(tiny_encoder, images, torch.device("cpu"))
    m = cka_matrix(layers, layers)
    assert m.shape == (2, 2)
    assert np.allclose(np.diag(m), 1.0, atol=1e-9)
    assert np.allclose(m, m.T)
    assert 0 < m[0, 1] < 1  # two different blocks are not the same representation


def test_linear_cka_matches_the_formula_and_its_invariances():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 6)), rng.normal(size=(50, 4))
    xc, yc = x - x.mean(0), y - y.mean(0)
    want = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert linear_cka(x, y) == pytest.approx(want, rel=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0, abs=1e-12)  # rotation, scale and shift
    with pytest.raises(MimbenchError, match="same images"):
        linear_cka(x, y[:10])


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_rankme_of_a_rank_r_matrix_equals_its_definition(rank):
    rng = np.random.default_rng(rank)
    n, d = 40, 10
    u, _ = np.linalg.qr(rng.normal(size=(n, n)))
    v, _ = np.linalg.qr(rng.normal(size=(d, d)))
    sigma = np.sort(rng.uniform(0.5, 3.0, size=rank))[::-1]
    z = u[:, :rank] @ np.diag(sigma) @ v[:, :rank].T
    # Garrido et al. 2023, Eq. 1: p_k = sigma_k / ||sigma||_1 + eps over all min(N, D) singular values (zeros too)
    p = np.concatenate([sigma / sigma.sum(), np.zeros(min(n, d) - rank)]) + 1e-7
    assert RANKME_EPS == 1e-7
    assert rankme(z) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    flat = u[:, :rank] @ v[:, :rank].T  # equal singular values: an effective rank of r (up to eps)
    assert rankme(flat) == pytest.approx(rank, rel=1e-4)
