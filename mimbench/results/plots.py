"""Figures for reports: encoders against the random control, metric vs pre-training epochs, per-class IoU,
pre-training loss curves, top-1 vs the number of fine-tuned blocks (MAE Figure 9).

Everything renders with matplotlib's Agg backend (no display needed) and is saved as PNG;
each function returns the path it wrote.
"""
from __future__ import annotations

import json
from pathlib import Path

from mimbench.atomic import atomic_write
from mimbench.errors import MimbenchError


def _save(fig, out: str | Path) -> Path:
    """Lay out, write as PNG (100 dpi) and close ``fig``; returns the path."""
    fig.tight_layout()
    out = Path(out)

    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"), what="the figure",
                 fix="Give --out a path in a folder you can write to.")
    _pyplot().close(fig)
    return out


def _pyplot():
    # matplotlib (with its font cache) is imported only when a figure is drawn: tables never need it
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


#: Technique name of a randomly initialised, never trained encoder (``mimbench control``): the reference line.
CONTROL_TECHNIQUE = "random-init"


def plot_summary(summary, out: str | Path, *, columns: list[str], labels: list[str],
                 control: str = CONTROL_TECHNIQUE) -> Path:
    """One panel per metric: a bar per encoder (mean, ± std as an error bar when n > 1), side by side.

    The random control's bar is grey and hatched and its mean is drawn across the panel as a dashed line,
    so a reader sees at once which encoders beat it; the value axis starts a little below the lowest bar, so
    that differences of a point or two are visible. ``summary``: DataFrame with label, column, technique,
    mean, std, n (as :func:`mimbench.results.report.summarize`); ``columns``: the panels in order;
    ``labels``: the bars in order.
    """
    if summary.empty:
        raise MimbenchError("No results to plot.", "Give folders holding finished run records.")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(columns), figsize=(max(3.2, 0.55 * len(labels) + 1.6) * len(columns), 3.8),
                             squeeze=False)
    for ax, column in zip(axes[0], columns):
        sub = summary[summary["column"] == column].set_index("label")
        names = [lab for lab in labels if lab in sub.index]
        means = [float(sub.loc[n, "mean"]) for n in names]
        is_control = [sub.loc[n, "technique"] == control for n in names]
        bars = ax.bar(range(len(names)), means, color=["0.75" if c else f"C{i}" for i, c in enumerate(is_control)],
                      edgecolor="0.3", linewidth=0.6)
        for bar, c in zip(bars, is_control):
            if c:
                bar.set_hatch("//")
        several = [i for i, n in enumerate(names) if int(sub.loc[n, "n"]) > 1]
        if several:  # ± std over seeds, only where a bar is the mean of several runs
            ax.errorbar(several, [means[i] for i in several],
                        yerr=[float(sub.loc[names[i], "std"]) for i in several], fmt="none", ecolor="k", capsize=3)
        for i, m in enumerate(means):
            ax.annotate(f"{m:.1f}", (i, m), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")
        controls = [m for m, c in zip(means, is_control) if c]
        if controls:
            ax.axhline(controls[0], color="0.3", ls="--", lw=1)
        low = min(means) if means else 0.0
        ax.set_ylim(max(0.0, low - 0.25 * (max(means) - low + 5.0)), None)  # differences, not the axis floor
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(column)
        ax.grid(axis="y", alpha=0.3)
    if (summary["technique"] == control).any():
        fig.suptitle("grey hatched bar and dashed line: random initialisation, no pre-training; "
                     "error bars: ± std over seeds", fontsize=8)
    return _save(fig, out)


def has_epoch_series(summary) -> bool:
    """Whether some technique has results at two or more pre-training epoch values (else no line to draw)."""
    data = summary[(summary["epochs"] > 0) & summary["technique"].astype(bool)]
    return bool((data.groupby("technique")["epochs"].nunique() >= 2).any()) if not data.empty else False


def plot_metric_vs_epochs(summary, out: str | Path, *, tasks: dict[str, str] | None = None) -> Path:
    """One panel per task: mean metric (± std over seeds as error bars) vs pre-training epochs, one line per technique.

    ``summary``: DataFrame with columns technique, epochs (float, > 0), task, mean, std, n.
    ``tasks``: task -> axis label (default: the task names). Raises MimbenchError when nothing is plottable.
    """
    data = summary[(summary["epochs"] > 0) & summary["technique"].astype(bool)]
    if data.empty:
        raise MimbenchError("No run with a technique and pre-training epochs to plot.",
                            "Metric-vs-epochs plots need encoders exported by `mimbench pretrain`.")
    tasks = tasks or {t: t for t in sorted(data["task"].unique())}
    present = [t for t in tasks if t in set(data["task"])]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.6), squeeze=False)
    for ax, task in zip(axes[0], present):
        for technique, grp in data[data["task"] == task].groupby("technique"):
            grp = grp.sort_values("epochs")
            ax.errorbar(grp["epochs"], grp["mean"], yerr=grp["std"].fillna(0.0), marker="o", capsize=3,
                        label=technique)
        ax.set_xlabel("pre-training epochs")
        ax.set_ylabel(tasks[task])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out)


def plot_partial_finetune(points, out: str | Path, *, title: str = "", paper: dict[str, float] | None = None,
                          lines: dict[str, float] | None = None) -> Path:
    """Top-1 (%) against the number of fine-tuned last blocks, as MAE's Figure 9: one marker per point on evenly
    spaced ticks in the given order, each labelled with its value and the fine-tuning epochs that gave it.

    ``points``: ``(tick label, top-1, epochs)`` in x order (e.g. "0", "MLP", "1", ..., "all"). ``paper``: tick label
    -> a published value, drawn as hollow markers on the same ticks; ``lines``: label -> a value drawn across the
    panel as a dashed line (e.g. another method's linear probe). Raises MimbenchError when ``points`` is empty."""
    if not points:
        raise MimbenchError("No partial fine-tuning result to plot.",
                            "Run the sweep first (mimbench reproduce mae-fig9); each point needs a finished record.")
    labels = [label for label, _, _ in points]
    values = [float(v) for _, v, _ in points]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 0.6 * len(labels) + 2.0), 3.6))
    ax.plot(range(len(labels)), values, marker="o", color="C0", label="this run (best epochs per point)")
    for i, (_, value, epochs) in enumerate(points):
        ax.annotate(f"{value:.1f}\n{epochs} ep", (i, value), ha="center", va="bottom", fontsize=7, xytext=(0, 3),
                    textcoords="offset points")
    known = [(labels.index(k), v) for k, v in (paper or {}).items() if k in labels]
    if known:
        ax.plot([i for i, _ in known], [v for _, v in known], ls="none", marker="s", mfc="none", color="C3",
                label="paper")
    for j, (name, value) in enumerate((lines or {}).items()):
        ax.axhline(value, color=f"C{j + 4}", ls="--", lw=1, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_xlabel("blocks fine-tuned (the last ones)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out)


def plot_per_class_iou(per_class: dict[str, float], out: str | Path, *, title: str = "") -> Path:
    """Bar chart of IoU (%) per class, in the given class order, with the mean as a dashed line."""
    if not per_class:
        raise MimbenchError("No per-class IoU to plot.", "Segmentation records store metrics.per_class_iou.")
    names = list(per_class)
    values = [float(per_class[n]) for n in names]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(names) + 1.5), 3.6))
    ax.bar(range(len(names)), values, color="tab:blue")
    ax.axhline(sum(values) / len(values), color="k", ls="--", lw=1, label="mean")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, out)


def read_loss_log(path: str | Path) -> tuple[list[int], list[float]]:
    """(iterations, losses) from a training ``log.jsonl``: lines with numeric "it" and "loss"; others skipped."""
    its, losses = [], []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise MimbenchError(f"Cannot read the training log {path}: {e.strerror or e}.",
                            "Give the log.jsonl written by `mimbench pretrain`.") from e
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run
        if isinstance(entry, dict) and isinstance(entry.get("it"), (int, float)) \
                and isinstance(entry.get("loss"), (int, float)):
            its.append(int(entry["it"]))
            losses.append(float(entry["loss"]))
    return its, losses


def plot_loss_curve(log_path: str | Path, out: str | Path, *, title: str = "") -> Path:
    """Pre-training loss vs iteration from a run's ``log.jsonl``."""
    its, losses = read_loss_log(log_path)
    if not its:
        raise MimbenchError(f"{log_path} has no lines with 'it' and 'loss'.",
                            "Give the log.jsonl of a pre-training run that logged at least one step.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(its, losses, lw=1.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title or Path(log_path).parent.name, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_attention_distance(series: dict[str, list[float]], out: str | Path) -> Path:
    """Mean attention distance (pixels, mean over heads) against the block index, one line per analysed encoder
    (``series``: label -> one value per block, ``mimbench analyze``'s ``attention_distance_mean``); encoders of
    different depths share the axis, each to its own last block."""
    if not series:
        raise MimbenchError("No analysed encoders to plot.", "Run mimbench analyze first.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, values) in enumerate(series.items()):
        ax.plot(range(len(values)), values, marker="o", color=f"C{i}", label=label)
    ax.xaxis.get_major_locator().set_params(integer=True)  # blocks are whole numbers
    ax.set_xlabel("block (0 = first)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_title("Attention distance against depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)
