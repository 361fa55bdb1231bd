"""DDAE distance map, dynamic weights and beta schedules against hand/brute-force computations."""
import math

import pytest
import torch

from mimbench.errors import MimbenchError
from pretrain.dds import (
    DynamicBeta,
    NoVisiblePatchError,
    distance_map,
    dynamic_weights,
    ema_momentum,
    feature_loss,
    schedule_value,
    weighted_masked_mean,
)


def brute_force(mask, h, w, metric):
    """Python loops over patches: distance of each masked patch to the nearest visible one."""
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for n in range(mask.shape[0]):
        vis = [(j // w, j % w) for j in range(h * w) if mask[n, j] == 0]
        for i in range(h * w):
            if mask[n, i] == 0:
                continue
            r, c = i // w, i % w
            best = math.inf
            for vr, vc in vis:
                dr, dc = abs(r - vr), abs(c - vc)
                d = {"euclidean": math.hypot(dr, dc), "chebyshev": max(dr, dc), "manhattan": dr + dc}[metric]
                best = min(best, d)
            out[n, i] = best
    return out


def random_mask(n, num_patches, ratio, seed):
    g = torch.Generator().manual_seed(seed)
    keep = int(num_patches * (1 - ratio))
    ids = torch.rand(n, num_patches, generator=g).argsort(1)
    mask = torch.ones(n, num_patches)
    mask.scatter_(1, ids[:, :keep], 0.0)
    return mask


@pytest.mark.parametrize("metric", ["euclidean", "chebyshev", "manhattan"])
@pytest.mark.parametrize("grid", [(8, 8), (5, 7)])
@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_distance_map_matches_brute_force(metric, grid, ratio):
    h, w = grid
    mask = random_mask(4, h * w, ratio, seed=h * 10 + int(ratio * 10))
    ref = brute_force(mask, h, w, metric).float()
    raw = distance_map(mask, grid, metric=metric, normalize="none")
    torch.testing.assert_close(raw, ref, rtol=0, atol=1e-6)
    assert (raw[mask == 0] == 0).all() and (raw[mask == 1] >= 1).all()
    by_max = distance_map(mask, grid, metric=metric)
    torch.testing.assert_close(by_max, ref / ref.amax(1, keepdim=True))
    assert by_max.amax(1).eq(1).all() and (by_max[mask == 0] == 0).all()
    diameter = {"euclidean": math.hypot(h - 1, w - 1), "chebyshev": max(h, w) - 1, "manhattan": h + w - 2}[metric]
    torch.testing.assert_close(distance_map(mask, grid, metric=metric, normalize="grid"), ref / diameter)


def test_distance_map_hand_example_and_int_grid():
    # 3x3 grid, only the top-left patch visible.
    mask = torch.ones(1, 9)
    mask[0, 0] = 0
    d = distance_map(mask, 3, metric="manhattan", normalize="none")
    assert d.view(3, 3).tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    e = distance_map(mask.bool(), 3, metric="chebyshev")  # bool masks accepted; max-normalised
    assert e.view(3, 3).tolist() == [[0, 0.5, 1], [0.5, 0.5, 1], [1, 1, 1]]


def test_distance_map_errors():
    mask = torch.zeros(2, 16)
    mask[1] = 1
    with pytest.raises(ValueError, match="no visible patch"):
        distance_map(mask, 4)
    with pytest.raises(NoVisiblePatchError):
        distance_map(mask, 4)
    with pytest.raises(MimbenchError, match="L = 3\\*3"):
        distance_map(torch.zeros(2, 16), 3)
    with pytest.raises(MimbenchError, match="metric"):
        distance_map(torch.zeros(2, 16), 4, metric="cosine")
    with pytest.raises(MimbenchError, match="normalisation"):
        distance_map(torch.zeros(2, 16), 4, normalize="sum")
    # no masked patch at all is fine: all zeros
    assert distance_map(torch.zeros(2, 16), 4).eq(0).all()


@pytest.mark.parametrize("beta", [-3.0, -0.5, 0.0, 0.7, 4.0])
def test_dynamic_weights_mean_one_and_order(beta):
    mask = random_mask(3, 64, 0.75, seed=1)
    d = distance_map(mask, 8)
    w = dynamic_weights(d, mask, beta)
    assert (w[mask == 0] == 0).all()
    torch.testing.assert_close((w * mask).sum(1) / mask.sum(1), torch.ones(3))
    for n in range(3):
        dm, wm = d[n][mask[n] == 1], w[n][mask[n] == 1]
        order = dm.argsort()
        ws = wm[order]
        if beta > 0:
            assert (ws[1:] >= ws[:-1] - 1e-6).all() and ws[-1] > ws[0]
        elif beta < 0:
            assert (ws[1:] <= ws[:-1] + 1e-6).all() and ws[-1] < ws[0]
        else:
            assert torch.equal(wm, torch.ones_like(wm))
        # farthest (d = 1) vs nearest: ratio exp(beta * (1 - d_min))
        torch.testing.assert_close(ws[-1] / ws[0], torch.tensor(math.exp(beta * (dm.max() - dm.min()))))


def test_dynamic_weights_extreme_beta_finite_and_grad():
    mask = random_mask(2, 64, 0.75, seed=2)
    d = distance_map(mask, 8, normalize="none")
    beta = torch.tensor(500.0, requires_grad=True)
    w = dynamic_weights(d, mask, beta)
    assert torch.isfinite(w).all()
    torch.testing.assert_close((w * mask).sum(1), mask.sum(1))
    loss = torch.rand(2, 64)
    beta2 = torch.tensor(0.3, requires_grad=True)
    weighted_masked_mean(loss, dynamic_weights(distance_map(mask, 8), mask, beta2), mask).backward()
    assert beta2.grad is not None and torch.isfinite(beta2.grad)


def test_weighted_masked_mean_beta_zero_is_mae_mean():
    mask = random_mask(2, 64, 0.75, seed=3)
    loss = torch.rand(2, 64)
    w = dynamic_weights(distance_map(mask, 8), mask, 0.0)
    assert torch.equal(weighted_masked_mean(loss, w, mask), (loss * mask).sum() / mask.sum())


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_scheduled_beta_moves_as_configured(kind):
    b = DynamicBeta(3, mode="scheduled", beta_start=-2.0, beta_end=1.0, schedule=kind)
    assert list(dict(b.named_parameters())) == []
    values = []
    for p in [0.0, 0.25, 0.5, 1.0, 1.5]:
        b.set_progress(p)
        beta = b()
        assert beta.shape == (3,) and torch.all(beta == beta[0])
        values.append(float(beta[0]))
    s = 0.25 if kind == "linear" else (1 - math.cos(math.pi / 4)) / 2
    assert values[0] == pytest.approx(-2.0) and values[2] == pytest.approx(-0.5)
    assert values[1] == pytest.approx(-2.0 + 3.0 * s)
    assert values[3] == pytest.approx(1.0) and values[4] == pytest.approx(1.0)  # clamped
    assert schedule_value(0.5, 0.0, 2.0, "linear") == 1.0


def test_fixed_beta_and_bad_args():
    b = DynamicBeta(2, mode="fixed", beta_start=0.0)
    b.set_progress(0.7)
    assert torch.equal(b(), torch.zeros(2))
    with pytest.raises(MimbenchError):
        DynamicBeta(2, mode="adaptive")
    with pytest.raises(MimbenchError):
        DynamicBeta(2, schedule="step")
    with pytest.raises(MimbenchError):
        DynamicBeta(2, mode="learnable", bound=0.0)


def test_learnable_beta_does_not_collapse():
    """Minimising a loss that is larger on far patches pulls beta towards near patches; the
    tanh bound keeps it within `bound` of the schedule, so the curriculum survives."""
    torch.manual_seed(0)
    b = DynamicBeta(2, mode="learnable", beta_start=-1.0, beta_end=1.0, bound=0.5)
    opt = torch.optim.SGD(b.parameters(), lr=50.0)
    mask = random_mask(4, 64, 0.75, seed=4)
    d = distance_map(mask, 8)
    per_patch = 0.1 + d**2  # far patches are harder
    b.set_progress(1.0)
    for _ in range(30):
        betas = b()
        loss = sum(weighted_masked_mean(per_patch, dynamic_weights(d, mask, betas[k]), mask) for k in range(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
    betas = b().detach()
    assert (betas < 1.0).all()  # it did move towards the easy patches ...
    assert (betas >= 0.5 - 1e-6).all() and (betas <= 1.5).all()  # ... but stays within its bounds
    assert float(b.regularizer().detach()) <= 2 * 0.25 + 1e-6


def test_momentum_schedule_and_feature_losses():
    assert ema_momentum(0.0, 0.996) == pytest.approx(0.996)
    assert ema_momentum(0.5, 0.996) == pytest.approx(0.998)
    assert ema_momentum(1.0, 0.996) == pytest.approx(1.0)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    torch.testing.assert_close(feature_loss(s, t, "mse"), ((s - t) ** 2).mean(-1))
    torch.testing.assert_close(feature_loss(s, s * 3, "cosine"), torch.zeros(2, 5), atol=1e-6, rtol=0)
    diff = (s - t).abs()
    ref = torch.where(diff < 1, 0.5 * diff**2, diff - 0.5).mean(-1)
    torch.testing.assert_close(feature_loss(s, t, "smooth_l1"), ref)
    with pytest.raises(MimbenchError):
        feature_loss(s, t, "l3")


def test_dynamic_weights_exactly_one_at_beta_zero_and_zero_without_masked_patches():
    mask = random_mask(3, 64, 0.75, seed=5)
    mask[2] = 0  # an image with nothing masked
    d = distance_map(mask, 8)
    for beta in (0.0, torch.zeros((), requires_grad=True)):
        w = dynamic_weights(d, mask, beta)
        assert torch.equal(w, mask)
    w = dynamic_weights(d, mask, 2.0)
    assert torch.isfinite(w).all() and w[2].eq(0).all()
