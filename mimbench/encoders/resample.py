"""Resampling position information to another patch grid: the one rule every path uses.

* :func:`resample_pos_embed` -- absolute position embeddings ``(1, P + h*w, D)``: the ``P``
  prefix positions (the class token) are kept as they are, the ``h x w`` patch grid is
  interpolated bicubically with ``align_corners=False`` and no anti-aliasing. This is what the
  official MAE fine-tuning (``util/pos_embed.py: interpolate_pos_embed``) and mmsegmentation's
  ViT/MAE backbones (``resize_pos_embed``) do. timm's ``resample_abs_pos_embed`` defaults to
  anti-aliased bicubic, which uses a different cubic kernel even when up-sampling (for a
  14x14 -> 32x32 grid the two differ by several percent), so it is not used anywhere.
* :func:`resize_rel_pos_table` -- BEiT relative-position-bias tables
  ``((2h-1)(2w-1) + 3, heads)``: the ``(2h-1) x (2w-1)`` offset grid is resampled with the
  geometric-progression spacing of BEiT (``beit/run_class_finetuning.py``) and mmsegmentation's
  ``BEiT.resize_rel_pos_embed`` (source offsets placed at 0, +-1, +-(1+q), ... so that the
  centre keeps its resolution), interpolated with a cubic spline per head; the 3 class-token
  entries at the end are kept. Both references call ``scipy.interpolate.interp2d(kind="cubic")``,
  which SciPy 1.14 removed; on gridded data it is the interpolating bicubic spline that
  ``RectBivariateSpline(kx=3, ky=3, s=0)`` computes (SciPy's interp2d transition guide), used here.
* :func:`resample_pos_embed_offset` -- DINOv2's rule (facebookresearch/dinov2
  ``models/vision_transformer.py: interpolate_pos_encoding``): bicubic in float32 with
  ``align_corners=False``; with an offset (0.1 for the models without registers) the interpolation
  is given the scale factor ``(g + offset) / M`` instead of the output size (the source coordinates
  then differ slightly from a size-based resize), with no anti-aliasing; with offset 0 (the register
  models) it is given the size, with anti-aliasing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mimbench.errors import MimbenchError


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


def resample_pos_embed(pos_embed: torch.Tensor, new_grid, old_grid=None, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Position embeddings ``(1, P + h*w, D)`` for the grid ``new_grid`` (int or (H, W)).

    ``old_grid`` defaults to the square grid the patch positions form. Computed in float32, returned
    in the input dtype; unchanged (the same tensor) when the grid already matches.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise MimbenchError(f"Position embedding of shape {tuple(pos_embed.shape)} is not (1, N, D).",
                            "Pass the encoder's pos_embed tensor.")
    n_patch = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n_patch)
        if side * side != n_patch:
            raise MimbenchError(f"Position embedding with {n_patch} patch positions is not a square grid.",
                                "Give old_grid=(h, w) for encoders pre-trained on non-square images.")
        old_grid = (side, side)
    old_h, old_w = _pair(old_grid)
    new_h, new_w = _pair(new_grid)
    if old_h * old_w != n_patch:
        raise MimbenchError(f"Grid {old_h}x{old_w} does not match {n_patch} patch positions.", "Check old_grid.")
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def resample_pos_embed_offset(pos_embed: torch.Tensor, new_grid, old_grid, num_prefix_tokens: int = 1, *,
                              offset: float = 0.1, antialias: bool = False) -> torch.Tensor:
    """Position embeddings ``(1, P + h*w, D)`` for ``new_grid`` by DINOv2's rule (see the module docstring).

    ``offset`` > 0: ``F.interpolate(scale_factor=((H + offset) / h, (W + offset) / w))``; 0: ``size=(H, W)``.
    Unchanged (the same tensor) when the grid already matches, as DINOv2 returns it.
    """
    old_h, old_w = _pair(old_grid)
    new_h, new_w = _pair(new_grid)
    n_patch = pos_embed.shape[1] - num_prefix_tokens
    if pos_embed.ndim != 3 or old_h * old_w != n_patch:
        raise MimbenchError(f"Position embedding of shape {tuple(pos_embed.shape)} does not hold a {old_h}x{old_w} "
                            f"grid after {num_prefix_tokens} prefix positions.", "Check old_grid.")
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    if offset:
        kwargs = {"scale_factor": ((new_h + offset) / old_h, (new_w + offset) / old_w)}
    else:
        kwargs = {"size": (new_h, new_w)}
    grid = F.interpolate(grid, mode="bicubic", align_corners=False, antialias=antialias, **kwargs)
    if tuple(grid.shape[-2:]) != (new_h, new_w):
        raise MimbenchError(f"Resampling position embeddings to {new_h}x{new_w} gave {tuple(grid.shape[-2:])}.",
                            "Use a smaller interpolation offset.")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def _geometric_offsets(src: int, dst: int) -> list[float]:
    """Source offsets (2r+1 of them, src = 2r+1) spread so that the outermost lands near dst // 2."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:  # bisection for the ratio q of 1 + q + q^2 + ... (src // 2 terms)
        q = (left + right) / 2.0
        total = (1.0 - q ** (src // 2)) / (1.0 - q)
        if total > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0.0] + dis


def resize_rel_pos_table(table: torch.Tensor, new_grid, old_grid=None, num_extra_tokens: int = 3) -> torch.Tensor:
    """A BEiT relative-position-bias table ``((2h-1)(2w-1) + 3, heads)`` for the patch grid ``new_grid``.

    ``old_grid`` defaults to the square grid the table's size implies. Unchanged (the same tensor)
    when the sizes already match. Square grids only, as in BEiT and mmsegmentation.
    """
    if table.ndim != 2:
        raise MimbenchError(f"Relative position bias table of shape {tuple(table.shape)} is not 2-D.",
                            "Pass a (positions, heads) table.")
    n_offsets, heads = table.shape[0] - num_extra_tokens, table.shape[1]
    if old_grid is None:
        side = math.isqrt(n_offsets)
        if side * side != n_offsets or side % 2 == 0:
            raise MimbenchError(f"A relative position bias table with {table.shape[0]} rows does not belong to a "
                                "square patch grid ((2g-1)^2 + 3 rows).", "Check the checkpoint.")
        old_grid = ((side + 1) // 2,) * 2
    old_h, old_w = _pair(old_grid)
    new_h, new_w = _pair(new_grid)
    if (2 * old_h - 1) * (2 * old_w - 1) != n_offsets:
        raise MimbenchError(f"Grid {old_h}x{old_w} does not match a table with {table.shape[0]} rows.", "Check old_grid.")
    if (old_h, old_w) == (new_h, new_w):
        return table
    if old_h != old_w or new_h != new_w:
        raise MimbenchError(f"Resizing relative position bias from a {old_h}x{old_w} to a {new_h}x{new_w} grid: "
                            "only square grids are supported (as in BEiT and mmsegmentation).",
                            "Use square inputs.")
    # scipy: only BEiT relative-position tables at another grid need it (its import costs more than the rest)
    from scipy.interpolate import RectBivariateSpline

    src, dst = 2 * old_h - 1, 2 * new_h - 1
    offsets = _geometric_offsets(src, dst)
    half = dst // 2
    targets = [float(t) for t in range(-half, half + 1)]
    body, extra = table[:n_offsets].detach(), table[n_offsets:]
    columns = []
    for h in range(heads):
        values = body[:, h].reshape(src, src).double().numpy()
        spline = RectBivariateSpline(offsets, offsets, values, kx=3, ky=3, s=0)
        columns.append(torch.from_numpy(spline(targets, targets)).reshape(-1, 1))
    resized = torch.cat(columns, dim=1).to(table.dtype)
    return torch.cat([resized, extra], dim=0)
