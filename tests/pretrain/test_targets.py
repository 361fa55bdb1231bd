"""Target normalisation and masking helpers against hand formulas."""
import pytest
import torch

from mimbench.errors import MimbenchError
from pretrain import masking, targets
from pretrain.targets import TargetNorm


def sample(seed=0):
    g = torch.Generator().manual_seed(seed)
    # Patches of very different contrast, so per-patch and population statistics differ.
    scale = torch.rand(2, 5, 1, generator=g) * 3 + 0.01
    return torch.randn(2, 5, 12, generator=g) * scale + 0.5


def test_none_and_patch_modes():
    t = sample()
    assert torch.equal(TargetNorm("none")(t), t)
    out = TargetNorm("patch")(t)
    for i in range(2):
        for j in range(5):
            v = t[i, j]
            expected = (v - v.mean()) / (v.var(unbiased=True) + 1e-6) ** 0.5
            assert torch.allclose(out[i, j], expected, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_batch_mode_blends_patch_and_population_statistics(alpha):
    t = sample(1)
    out = TargetNorm("batch", alpha=alpha)(t)
    vals = t.flatten().tolist()
    gm = sum(vals) / len(vals)
    gv = sum((v - gm) ** 2 for v in vals) / len(vals)  # biased, over every value of every patch
    for i in range(2):
        for j in range(5):
            v = t[i, j]
            mean = alpha * v.mean() + (1 - alpha) * gm
            var = alpha * v.var(unbiased=True) + (1 - alpha) * gv
            assert torch.allclose(out[i, j], (v - mean) / (var + 1e-6) ** 0.5, atol=1e-5)
    if alpha == 1.0:
        assert torch.allclose(out, TargetNorm("patch")(t), atol=1e-6)


def test_population_normalisation_smooths_inter_patch_variance():
    t = sample(2)
    per_patch_std = lambda x: x.std(-1).flatten()  # noqa: E731
    patch = per_patch_std(TargetNorm("patch")(t))
    blend = per_patch_std(TargetNorm("batch", alpha=0.5)(t))
    assert torch.allclose(patch, torch.ones_like(patch), atol=1e-4)  # every patch forced to unit variance
    # With population statistics, low-contrast patches stay low-contrast (no amplification).
    lowest = t.std(-1).flatten().argmin()
    assert blend[lowest] < 0.5 * patch[lowest]


def test_ema_mode_running_statistics():
    tn = TargetNorm("ema", alpha=0.0, momentum=0.5)
    assert {k for k, _ in tn.named_buffers()} == {"running_mean", "running_var", "num_updates"}
    assert dict(TargetNorm("batch").named_buffers()) == {}
    a, b = sample(3), sample(4) * 2
    out_a = tn(a, update=True)
    assert torch.allclose(out_a, TargetNorm("batch", alpha=0.0)(a), atol=1e-6)  # first batch initialises
    tn(b, update=True)
    mean = 0.5 * a.double().mean() + 0.5 * b.double().mean()
    var = 0.5 * a.double().var(unbiased=False) + 0.5 * b.double().var(unbiased=False)
    assert tn.running_mean.item() == pytest.approx(mean.item(), rel=1e-5)
    assert tn.running_var.item() == pytest.approx(var.item(), rel=1e-5)
    out = tn(a, update=False)
    assert torch.allclose(out, (a - mean.float()) / (var.float() + 1e-6) ** 0.5, atol=1e-5)
    assert int(tn.num_updates) == 2


def test_ema_statistics_state_follows_load_state_dict():
    """The step never reads num_updates back from the device; a loaded state dict still decides."""
    trained = TargetNorm("ema", alpha=0.0, momentum=0.5)
    trained(sample(3), update=True)
    fresh = TargetNorm("ema", alpha=0.0, momentum=0.5)
    with pytest.raises(MimbenchError, match="no running statistics"):
        fresh(sample(4), update=False)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh(sample(4), update=False), trained(sample(4), update=False))
    trained.load_state_dict(TargetNorm("ema").state_dict())  # back to "never updated"
    with pytest.raises(MimbenchError, match="no running statistics"):
        trained(sample(4), update=False)
    b = sample(5)
    assert torch.allclose(trained(b, update=True), TargetNorm("batch", alpha=0.0)(b), atol=1e-6)  # re-initialises


def test_target_norm_validation():
    with pytest.raises(MimbenchError, match="target_norm"):
        TargetNorm("group")
    with pytest.raises(MimbenchError, match="alpha"):
        TargetNorm("batch", alpha=2.0)
    with pytest.raises(MimbenchError, match="momentum"):
        TargetNorm("ema", momentum=1.0)


def test_loss_helpers():
    pred, target = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 3.0], [2.0, 2.0], [0.0, 0.0]]])
    per_patch = targets.per_patch_mse(pred, target)
    assert per_patch.tolist() == [[5.0, 4.0, 0.0]]
    assert targets.masked_mean(per_patch, torch.tensor([[1.0, 0.0, 1.0]])).item() == 2.5


def test_masking_helpers():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.4, 0.6]])
    m = masking.random_masking(2, 4, 0.5, noise)
    assert m.len_keep == 2
    assert m.mask.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]
    assert m.ids_shuffle.tolist() == [[1, 3, 2, 0], [0, 2, 3, 1]]
    assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), torch.arange(4).expand(2, 4))
    assert masking.num_keep(196, 0.6) == 78  # official truncation
    assert masking.num_inserted(100, 0.29) == 29 and masking.num_inserted(48, 1.0) == 48
    with pytest.raises(MimbenchError):
        masking.random_masking(2, 4, 0.5, torch.rand(2, 5))
