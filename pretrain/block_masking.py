"""Block-wise masking of BEiT (Bao et al. 2022, section 2.5), used by BEiT v2 pre-training.

The algorithm (re-implemented from the paper's description and its public generator's knobs):
repeat until ``num_masking_patches`` patches are masked - draw a block area ``s`` uniformly in
``[min_num_patches, max_block]`` (``max_block`` = the patches still to mask, capped at
``max_num_patches``), an aspect ratio ``r`` log-uniformly in ``[min_aspect, max_aspect]``, set
``h = round(sqrt(s * r))``, ``w = round(sqrt(s / r))``, place the ``h x w`` rectangle uniformly at
random inside the grid (it must fit strictly: ``h < H``, ``w < W``), and accept it only if it adds
at least one and at most ``max_block`` new patches; up to 10 tries per block, and the mask is
returned as it stands when 10 tries in a row add nothing. So a mask never holds more than
``num_masking_patches`` patches and falls short only by the few patches no block could add: with
BEiT v2's 75 of 14 x 14 (blocks of at least 16) 65% of masks hold exactly 75 and the mean is 74.5
(99.3% of the target); the demo's 25 of 8 x 8 (blocks >= 5) averages 24.9. The tests check this.

Randomness comes from a ``torch.Generator`` (or the global torch RNG), so a seeded run draws
the same masks. Masks are ``bool`` ``H x W`` (``True`` = masked) or flattened ``N x L`` in
row-major patch order, the order of the patch embedding's tokens.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from mimbench.errors import MimbenchError

_TRIES = 10


class BlockMaskGenerator:
    """Draws BEiT block-wise masks on an ``H x W`` patch grid.

    Args:
        grid_size: ``G`` or ``(H, W)`` patches.
        num_masking_patches: target number of masked patches per image (BEiT v2: 75 of 196).
        min_num_patches: smallest block area in patches (BEiT v2: 16).
        max_num_patches: largest block area (``None`` = ``num_masking_patches``).
        min_aspect: smallest block aspect ratio ``h / w`` (BEiT: 0.3).
        max_aspect: largest (``None`` = ``1 / min_aspect``).
    """

    def __init__(self, grid_size: int | Sequence[int], num_masking_patches: int, min_num_patches: int = 16,
                 max_num_patches: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None) -> None:
        h, w = (grid_size, grid_size) if isinstance(grid_size, int) else (int(v) for v in grid_size)
        self.height, self.width = int(h), int(w)
        self.num_patches = self.height * self.width
        n = int(num_masking_patches)
        if not 0 < n < self.num_patches:
            raise MimbenchError(
                f"num_mask_patches={num_masking_patches!r} must be between 1 and {self.num_patches - 1} "
                f"for a {self.height}x{self.width} patch grid.",
                "Keep at least one patch visible (BEiT v2 masks 75 of 196, about 40%).")
        if int(min_num_patches) < 1:
            raise MimbenchError(f"min_mask_patches_per_block must be >= 1, got {min_num_patches!r}.")
        if not float(min_aspect) > 0:
            raise MimbenchError(f"mask_min_aspect must be > 0, got {min_aspect!r}.")
        max_aspect = 1.0 / float(min_aspect) if max_aspect is None else float(max_aspect)
        if max_aspect < float(min_aspect):
            raise MimbenchError(f"mask_max_aspect={max_aspect} is below mask_min_aspect={min_aspect}.")
        self.num_masking_patches = n
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = n if max_num_patches is None else int(max_num_patches)
        self.log_aspect = (math.log(float(min_aspect)), math.log(max_aspect))

    def __repr__(self) -> str:
        return (f"BlockMaskGenerator({self.height}x{self.width}, masked={self.num_masking_patches}, "
                f"block=[{self.min_num_patches}, {self.max_num_patches}], "
                f"aspect=[{math.exp(self.log_aspect[0]):.3f}, {math.exp(self.log_aspect[1]):.3f}])")

    def _add_block(self, mask: torch.Tensor, max_block: int, u: torch.Tensor) -> int:
        """Try to add one block (``u``: ``_TRIES x 4`` uniforms); returns how many patches it added."""
        lo, hi = self.min_num_patches, max_block
        for t in range(_TRIES):
            area = lo + (hi - lo) * float(u[t, 0])  # uniform between the two, in either order
            aspect = math.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * float(u[t, 1]))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = min(int(float(u[t, 2]) * (self.height - h + 1)), self.height - h)
            left = min(int(float(u[t, 3]) * (self.width - w + 1)), self.width - w)
            region = mask[top:top + h, left:left + w]
            new = h * w - int(region.sum())
            if 0 < new <= max_block:
                region.fill_(True)
                return new
        return 0

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One ``H x W`` bool mask (``True`` = masked)."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < self.num_masking_patches:
            max_block = min(self.num_masking_patches - count, self.max_num_patches)
            u = torch.rand(_TRIES, 4, generator=generator, dtype=torch.float64)
            added = self._add_block(mask, max_block, u)
            if added == 0:
                break
            count += added
        return mask

    def batch(self, n: int, generator: torch.Generator | Sequence[torch.Generator] | None = None,
              device=None) -> torch.Tensor:
        """``n x L`` bool masks (row-major patch order) on ``device``. ``generator`` may also be ``n``
        generators, one per row (row ``i`` then depends on nothing but ``generator[i]``)."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != int(n):
                raise MimbenchError(f"{len(generator)} generators for {n} masks.", "Give one generator per mask.")
            masks = torch.stack([self(g).flatten() for g in generator])
        else:
            masks = torch.stack([self(generator).flatten() for _ in range(int(n))])
        return masks if device is None else masks.to(device, non_blocking=True)
