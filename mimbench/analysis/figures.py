"""The figures of ``mimbench analyze`` (PNG, matplotlib's Agg backend, 100 dpi, written atomically): attention
distance and entropy against depth, per-layer probe accuracy and RankMe, CKA heat maps, and the pre-training
run's loss by distance to the nearest visible patch. Each function returns the path it wrote."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mimbench.atomic import atomic_write


def _pyplot():
    # matplotlib (with its font cache) is imported only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    atomic_write(Path(out), lambda tmp: fig.savefig(tmp, dpi=100, format="png"), what="the analysis figure",
                 fix="Give --out a folder you can write to.")
    _pyplot().close(fig)
    return Path(out)


def plot_per_head(values, out: Path, *, ylabel: str, title: str) -> Path:
    """Every head's value (dots) and the mean over heads (line) against the block index; ``values`` depth×heads."""
    plt = _pyplot()
    v = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4))
    blocks = np.arange(v.shape[0])
    for h in range(v.shape[1]):
        ax.scatter(blocks, v[:, h], s=14, color="0.55", zorder=2, label="heads" if h == 0 else None)
    ax.plot(blocks, v.mean(axis=1), marker="o", color="C0", zorder=3, label="mean over heads")
    ax.set(xlabel="block (0 = first)", ylabel=ylabel, title=title)
    ax.set_xticks(blocks)
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_layer_curves(curves: dict[str, list], out: Path, *, ylabel: str, title: str) -> Path:
    """One line per named curve (a value per block) against the block index."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        ax.plot(range(len(values)), values, marker="o", label=name)
    ax.xaxis.get_major_locator().set_params(integer=True)  # blocks are whole numbers
    ax.set(xlabel="block (0 = first)", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_cka(matrix, out: Path, *, rows: str, cols: str, title: str) -> Path:
    """Heat map of a CKA matrix (rows: the blocks of ``rows``, columns: those of ``cols``; both depths shown)."""
    plt = _pyplot()
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 + 0.45 * m.shape[1]), max(3.5, 1.2 + 0.45 * m.shape[0])))
    image = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis", origin="lower")
    ax.set(xlabel=f"{cols}: block ({m.shape[1]} blocks)", ylabel=f"{rows}: block ({m.shape[0]} blocks)")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]))
    fig.colorbar(image, ax=ax, label="linear CKA")
    return _save(fig, out)


def plot_loss_by_distance(bins: dict, out: Path, *, title: str) -> Path:
    """Mean reconstruction loss of masked patches per nearest-visible distance bin (patch counts annotated)."""
    plt = _pyplot()
    keys = sorted(bins, key=int)
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar([int(k) for k in keys], [bins[k]["loss"] for k in keys], color="C1")
    for bar, k in zip(bars, keys):
        ax.annotate(f"n={bins[k]['patches']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set(xlabel="distance to the nearest visible patch (patches, rounded)", ylabel="reconstruction loss (MSE)",
           title=title)
    return _save(fig, out)


__all__ = ["plot_cka", "plot_layer_curves", "plot_loss_by_distance", "plot_per_head"]
