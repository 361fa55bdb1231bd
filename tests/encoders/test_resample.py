"""The one resampler of position information (absolute embeddings, BEiT relative-position tables)."""
from __future__ import annotations

import pytest
import torch

from mimbench.encoders.resample import _geometric_offsets, resample_pos_embed, resize_rel_pos_table
from mimbench.errors import MimbenchError


def test_pos_embed_is_plain_bicubic_with_class_position_apart():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 7 * 7, 16)
    out = resample_pos_embed(pos, (12, 10))
    grid = pos[:, 1:].reshape(1, 7, 7, 16).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(12, 10), mode="bicubic", align_corners=False)
    assert out.shape == (1, 1 + 120, 16)
    assert torch.equal(out[:, 0], pos[:, 0])
    assert torch.allclose(out[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 120, 16), atol=1e-6)
    assert resample_pos_embed(pos, 7) is pos  # same grid: untouched
    assert resample_pos_embed(pos.half(), 9).dtype == torch.float16
    with pytest.raises(MimbenchError, match="not a square grid"):
        resample_pos_embed(torch.zeros(1, 1 + 12, 4), 4)


def test_geometric_offsets_reach_the_new_half_size_with_unit_steps_at_the_centre():
    offsets = _geometric_offsets(27, 63)  # 14x14 -> 32x32 grid (224 encoder at the 512 crop)
    assert len(offsets) == 27 and offsets[13] == 0.0 and offsets[14] == 1.0 and offsets[12] == -1.0
    assert offsets == [-o for o in reversed(offsets)]
    assert offsets[-1] == pytest.approx(31.0, abs=1e-3)  # 1 + q + ... + q^12 reaches 63 // 2
    # BEiT's bisection keeps q in [1.01, 1.5]: small grids blown up a lot stop short (the rest is clamped)
    assert _geometric_offsets(7, 15)[-1] == pytest.approx(1 + 1.5 + 2.25, abs=1e-5)


def test_rel_table_resize_reproduces_cubic_polynomials():
    """An interpolating bicubic spline is exact on cubics: the resized table must equal the polynomial at the new offsets."""
    def poly(dy, dx, h):
        return 0.003 * dy ** 3 - 0.01 * dy * dx ** 2 + 0.5 * dx + 0.2 * h + 1.0

    src_offsets = torch.tensor(_geometric_offsets(27, 63), dtype=torch.float64)
    dy, dx = torch.meshgrid(src_offsets, src_offsets, indexing="ij")
    table = torch.stack([poly(dy, dx, h).flatten() for h in range(2)], dim=1)
    extra = torch.tensor([[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]], dtype=torch.float64)
    out = resize_rel_pos_table(torch.cat([table, extra]), 32)  # 14x14 -> 32x32 patch grid
    assert out.shape == (63 * 63 + 3, 2) and torch.equal(out[-3:], extra)
    t = torch.arange(-31, 32, dtype=torch.float64)
    ty, tx = torch.meshgrid(t, t, indexing="ij")
    want = torch.stack([poly(ty, tx, h).flatten() for h in range(2)], dim=1)
    assert torch.allclose(out[:-3], want, atol=1e-8)
    assert resize_rel_pos_table(out, 32) is out
    with pytest.raises(MimbenchError, match="square patch grid"):
        resize_rel_pos_table(torch.zeros(50, 2), 8)
