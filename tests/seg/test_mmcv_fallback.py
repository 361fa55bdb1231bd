import math

import pytest
import torch

import mimbench.seg  # noqa: F401  (registers the fallback before mmseg is imported)
from mimbench.errors import MimbenchError
from mimbench.seg import mmcv_ops_fallback as fb


def test_mmseg_models_import_after_mimbench_seg():
    import mmcv.ops
    import mmseg.models  # noqa: F401  (fails with "No module named 'mmcv._ext'" without the fallback)
    from mmseg.registry import MODELS

    assert MODELS.get("UPerHead") is not None
    assert MODELS.get("FocalLoss") is not None
    if mimbench.seg.MMCV_OPS_FALLBACK:
        assert mmcv.ops.point_sample is fb.point_sample


def _bilinear(img, x, y):
    """Hand bilinear interpolation of a H x W image at pixel-centre coordinates (x, y)."""
    x0, y0 = math.floor(x), math.floor(y)
    dx, dy = x - x0, y - y0
    return (
        img[y0, x0] * (1 - dx) * (1 - dy)
        + img[y0, x0 + 1] * dx * (1 - dy)
        + img[y0 + 1, x0] * (1 - dx) * dy
        + img[y0 + 1, x0 + 1] * dx * dy
    )


def test_point_sample_matches_hand_bilinear():
    torch.manual_seed(0)
    n, c, h, w, p = 2, 3, 5, 7, 6
    feats = torch.randn(n, c, h, w, dtype=torch.float64)
    points = 0.15 + 0.7 * torch.rand(n, p, 2, dtype=torch.float64)  # inside, away from the zero-padded border
    out = fb.point_sample(feats, points)
    assert out.shape == (n, c, p)
    for i in range(n):
        for k in range(p):
            # align_corners=False: normalised 0..1 covers the outer pixel edges.
            x = points[i, k, 0].item() * w - 0.5
            y = points[i, k, 1].item() * h - 0.5
            for ch in range(c):
                assert out[i, ch, k].item() == pytest.approx(_bilinear(feats[i, ch], x, y).item(), abs=1e-10)
    grid_out = fb.point_sample(feats, points.view(n, 2, 3, 2))
    assert torch.allclose(grid_out.reshape(n, c, p), out)


def test_sigmoid_focal_loss_matches_hand_formula():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, dtype=torch.float64)
    target = torch.tensor([0, 2, 3, 1])  # 3 == num_classes: every class negative
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    gamma, alpha = 2.0, 0.25
    expected = torch.zeros(4, 3, dtype=torch.float64)
    for n in range(4):
        for c in range(3):
            p = 1 / (1 + math.exp(-logits[n, c].item()))
            if target[n] == c:
                expected[n, c] = -alpha * (1 - p) ** gamma * math.log(p)
            else:
                expected[n, c] = -(1 - alpha) * p**gamma * math.log(1 - p)
    none = fb.sigmoid_focal_loss(logits, target, gamma, alpha, None, "none")
    assert torch.allclose(none, expected, atol=1e-12)
    assert fb.sigmoid_focal_loss(logits, target, gamma, alpha).item() == pytest.approx(expected.sum().item() / 4)
    assert fb.sigmoid_focal_loss(logits, target, reduction="sum").item() == pytest.approx(expected.sum().item())
    row_w = torch.tensor([1.0, 0.5, 1.0, 2.0], dtype=torch.float64)  # weight[target], 1 for the background row
    weighted = fb.sigmoid_focal_loss(logits, target, gamma, alpha, weight, "none")
    assert torch.allclose(weighted, expected * row_w[:, None], atol=1e-12)


def test_placeholder_raises_clear_error_and_dunders_stay_missing():
    ops = fb.build_module()
    deform = ops.DeformConv2d  # importing a missing op works ...
    with pytest.raises(MimbenchError, match="needs full mmcv with compiled ops"):
        deform(3, 3, 3)  # ... using it names what is missing
    with pytest.raises(MimbenchError, match="mmcv.ops.nms"):
        ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    assert hasattr(ops, "__wrapped__") is False
    assert hasattr(ops, "__path__") is False
    with pytest.raises(AttributeError):
        ops.__custom__
