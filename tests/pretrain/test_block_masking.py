"""BEiT block-wise masking: the masked count meets the target on average, never exceeds it, and the
mask is a union of rectangles of at least the minimum block size."""
import math

import pytest
import torch
from scipy import ndimage

from mimbench.errors import MimbenchError
from pretrain.block_masking import BlockMaskGenerator


def test_beitv2_setting_masks_75_of_196_on_average():
    gen = BlockMaskGenerator(14, 75, min_num_patches=16)
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([int(gen(g).sum()) for _ in range(400)], dtype=torch.float64)
    assert counts.max() <= 75  # a block is only accepted if it adds no more than what is left
    # The ratio is met on average to within 1% (measured 74.47): a draw stops early when ten tries in
    # a row cannot add a block of <= the few patches left, and then falls short by a few patches only.
    assert counts.mean() > 0.99 * 75
    assert counts.min() >= 0.9 * 75 and (counts == 75).float().mean() > 0.5


def test_demo_setting_and_batch_shape():
    gen = BlockMaskGenerator(8, 25, min_num_patches=5)
    m = gen.batch(300, torch.Generator().manual_seed(1))
    assert m.shape == (300, 64) and m.dtype == torch.bool
    assert m.sum(1).float().mean() > 0.99 * 25 and m.sum(1).max() <= 25
    # every patch position gets masked sometimes (placement is uniform over the grid)
    assert (m.float().mean(0) > 0.05).all()


def test_masks_are_made_of_contiguous_blocks():
    """Masked patches form few 4-connected regions (rectangles of >= min patches), unlike random masking."""
    gen = BlockMaskGenerator(14, 75, min_num_patches=16)
    g = torch.Generator().manual_seed(2)
    blocks, randoms = [], []
    for _ in range(100):
        m = gen(g).numpy()
        _, n = ndimage.label(m)
        blocks.append(n)
        r = torch.zeros(196, dtype=torch.bool)
        r[torch.randperm(196, generator=g)[:75]] = True
        _, nr = ndimage.label(r.reshape(14, 14).numpy())
        randoms.append(nr)
    assert sum(blocks) / len(blocks) < 5  # a handful of regions
    assert sum(randoms) / len(randoms) > 15  # independent patches scatter into many


def test_blocks_are_rectangles_within_the_aspect_range():
    # target = min block size = 16: the first accepted block is the whole mask unless rounding its sides
    # gave fewer than 16 patches (e.g. 7 x 2), in which case a second small block tops it up
    gen = BlockMaskGenerator(14, 16, min_num_patches=16, min_aspect=0.3)
    g = torch.Generator().manual_seed(3)
    single = 0
    for _ in range(100):
        m = gen(g)
        assert int(m.sum()) <= 16
        rows = torch.nonzero(m.any(1)).flatten()
        cols = torch.nonzero(m.any(0)).flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        if int(m.sum()) == h * w:  # one filled rectangle
            single += 1
            assert h < 14 and w < 14
            # aspect ratio h / w within [0.3, 1/0.3], widened by the rounding of both sides
            assert (math.sqrt(16 * 0.3) - 0.5) / (math.sqrt(16 / 0.3) + 0.5) <= h / w
            assert h / w <= (math.sqrt(16 / 0.3) + 0.5) / (math.sqrt(16 * 0.3) - 0.5)
    assert single > 50


def test_seeded_generator_is_deterministic():
    gen = BlockMaskGenerator(8, 25, min_num_patches=5)
    a = gen.batch(4, torch.Generator().manual_seed(7))
    b = gen.batch(4, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_one_generator_per_mask_makes_each_mask_independent_of_the_batch():
    """Per-image generators (the pre-training loop seeds one per image index): an image's mask is the
    same whichever batch, and at whichever position, it comes in."""
    gen = BlockMaskGenerator(8, 25, min_num_patches=5)

    def g(i):
        return torch.Generator().manual_seed(1000 + i)

    whole = gen.batch(4, [g(0), g(1), g(2), g(3)])
    halves = torch.cat([gen.batch(2, [g(2), g(3)]), gen.batch(2, [g(0), g(1)])])
    assert torch.equal(whole, halves[[2, 3, 0, 1]])
    assert not torch.equal(whole[0], whole[1])
    with pytest.raises(MimbenchError, match="one generator per mask"):
        gen.batch(3, [g(0), g(1)])


@pytest.mark.parametrize("kw", [dict(num_masking_patches=64), dict(num_masking_patches=0),
                                dict(num_masking_patches=10, min_num_patches=0),
                                dict(num_masking_patches=10, min_aspect=0.0)])
def test_bad_settings_raise(kw):
    with pytest.raises(MimbenchError):
        BlockMaskGenerator(8, **kw)
