"""Aggregate run records into one table: a row per technique/checkpoint, a column per evaluation.

Rows are the encoder's technique and pre-training epochs (``mae @ 800 ep``), or the encoder
file's stem when the record has no technique. Cells are the mean ± sample standard deviation
(ddof=1) over the runs of that row and evaluation with the run count, ``72.00 ± 2.00 (n=3)``,
when several runs (seeds) make the cell; a single run shows its value alone. A low-shot summary
record counts as its runs (seeds or split files), so its cell is their mean ± std. Runs whose
protocol deviates from the published one (recorded deviations, built-in demo data) are marked
with a dagger; under the table each distinct deviation is listed once, with the rows and columns
it applies to, followed by the files ``load_records`` had to skip. A one-line "how to read this"
precedes the notes. :func:`console_table` renders the same table for a terminal (rich).
"""
from __future__ import annotations

import html
import math
import tempfile
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from mimbench.atomic import atomic_write_text
from mimbench.errors import MimbenchError
from mimbench.evals import robustness
from mimbench.results import html_report, plots
from mimbench.results.leaderboard import field_text, record_metric, run_deviations
from mimbench.results.plots import CONTROL_TECHNIQUE
from mimbench.results.records import load_records

#: Record task -> report column, in display order. A segmentation column is named after its dataset
#: (``segment_column``): ADE20K mIoU and the demo's FashionMNIST-Seg mIoU are different numbers.
METRIC_COLUMNS = {
    "linear": "linear top-1",
    "attentive": "attentive top-1",
    "finetune": "fine-tune top-1",
    "knn": "k-NN top-1",
    "lowshot": "low-shot top-1",
    "segment": "ADE20K mIoU",
    "robustness": "robustness",  # one column per set: mimbench.evals.robustness.report_value
}
SEGMENT_DATASETS = {"ade20k": "ADE20K", "fashion-mnist-seg": "FashionMNIST-Seg"}


def segment_column(dataset: str) -> str:
    """Report column of a segmentation run on ``dataset`` (the record's dataset.name)."""
    name = SEGMENT_DATASETS.get(dataset.lower(), dataset) if dataset else "ADE20K"
    return f"{name} mIoU"


def lowshot_column(runs) -> str:
    """Report column of a low-shot summary whose ``protocol.runs`` are ``runs``: ``10-shot top-1`` for K
    images per class drawn per seed, else (split files) ``low-shot top-1``."""
    shots = {r.get("shots") for r in runs if isinstance(r, dict)}
    return f"{shots.pop()}-shot top-1" if len(shots) == 1 and None not in shots else METRIC_COLUMNS["lowshot"]


def _column(task: str, dataset) -> str:
    return segment_column(field_text(dataset)) if task == "segment" else METRIC_COLUMNS[task]


def _values(r) -> list[tuple[str, object, float]] | None:
    """(column, seed, value) of each run a flattened record stands for; None when it has no headline metric.

    A low-shot summary stands for its runs (``protocol.runs``, one per seed or split file): the cell is their
    mean ± std, the numbers the summary's top1 / top1_std hold. Its per-run records (``<out>/runs/``, with a
    ``protocol.subset``) are already counted through it and give nothing here."""
    if r["task"] == "lowshot":
        runs = r.get("protocol.runs")
        if not isinstance(runs, list):
            return []
        column = lowshot_column(runs)
        return [(column, run.get("seed", r["seed"]), float(run["top1"])) for run in runs]
    if r["task"] == "robustness":
        found = robustness.report_value(r)
        return None if found is None else [(found[0], r["seed"], found[1])]
    value = record_metric(r, r["task"])
    return None if value is None else [(_column(r["task"], r.get("dataset.name")), r["seed"], value)]
FORMATS = ("md", "csv", "latex", "html")
PER_CLASS_PREFIX = "metrics.per_class_iou."


def _label(technique: str, epochs: float, path: str) -> str:
    if technique:
        return f"{technique} @ {epochs:g} ep" if epochs > 0 else technique
    return Path(path).stem or "unknown encoder"


def _encoder_row(r) -> tuple[str, str, float]:
    """(table row label, technique, pre-training epochs) of a flattened record."""

    technique = field_text(r.get("encoder.technique"))
    epochs = pd.to_numeric(r.get("encoder.epochs"), errors="coerce")
    epochs = 0.0 if pd.isna(epochs) else float(epochs)
    return _label(technique, epochs, field_text(r.get("encoder.path"))), technique, epochs


def run_table(dirs) -> tuple["pandas.DataFrame", list[str]]:  # noqa: F821
    """One row per finished evaluation run: label, technique, epochs, task, seed, value, deviations, file.

    ``problems`` are the files load_records skipped plus runs without their headline metric.
    """


    dirs = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
    if not dirs:
        raise MimbenchError("No result directories given.", "Example: mimbench report runs/demo")
    table, problems = load_records(*dirs)
    rows = []
    for _, r in table.iterrows():
        if r["task"] not in METRIC_COLUMNS:
            continue
        if r["status"] != "ok":
            problems.append(f"{r['file']}: status {r['status']}; left out")
            continue
        values = _values(r)
        if values is None:
            problems.append(f"{r['file']}: no {'mIoU' if r['task'] == 'segment' else 'top1'} metric; left out")
            continue
        label, technique, epochs = _encoder_row(r)
        rows += [{"label": label, "technique": technique, "epochs": epochs, "task": r["task"], "column": column,
                  "seed": seed, "value": value, "deviations": run_deviations(r), "selections": run_selections(r),
                  "file": r["file"]}
                 for column, seed, value in values]
    cols = ["label", "technique", "epochs", "task", "column", "seed", "value", "deviations", "selections", "file"]
    return pd.DataFrame(rows, columns=cols), problems


#: Where a run's recorded selection (``protocol.selection.on``) was made, as the report's notes say it.
SELECTED_ON = {"train-holdout": "on a held-out part of the training set", "val": "on the val split (as published)"}


def run_selections(row) -> list[str]:
    """What a run selected and where (``protocol.selection``): ``["best_block selected on ..."]``; empty when the
    run selected nothing."""
    on = field_text(row.get("protocol.selection.on"))
    if not on:
        return []
    what = field_text(row.get("protocol.selection.selects")) or "the reported setting"
    epoch = pd.to_numeric(row.get("protocol.selection.epoch"), errors="coerce")
    if not pd.isna(epoch):  # an epoch selection: which epoch, with the last epoch's top-1 beside it
        of = pd.to_numeric(row.get("protocol.selection.of"), errors="coerce")
        last = pd.to_numeric(row.get("protocol.selection.last_epoch_top1"), errors="coerce")
        what += f" (epoch {int(epoch)}{'' if pd.isna(of) else f' of {int(of)}'}" + (
            "" if pd.isna(last) else f"; last epoch top-1 {float(last):.2f}") + ")"
    return [f"{what} selected {SELECTED_ON.get(on, 'on ' + on)}"]


def summarize(runs) -> "pandas.DataFrame":  # noqa: F821
    """Per (label, column): task, technique, epochs, mean, std (ddof=1; NaN when n=1), n, deviates (bool)."""

    if runs.empty:
        return pd.DataFrame(columns=["label", "column", "task", "technique", "epochs", "mean", "std", "n",
                                     "deviates"])
    runs = runs.assign(deviates=runs["deviations"].map(bool))
    agg = runs.groupby(["label", "column"], sort=False).agg(
        task=("task", "first"), technique=("technique", "first"), epochs=("epochs", "first"), mean=("value", "mean"),
        std=("value", "std"), n=("value", "size"), deviates=("deviates", "any"))
    return agg.reset_index()


def _cell(mean: float, std: float, n: int, deviates: bool, pm: str) -> str:
    """``mean ± std (n=k)`` over k > 1 runs; a single run's value alone; `` †`` when a run deviates."""

    text = f"{mean:.2f}" if n == 1 or math.isnan(std) else f"{mean:.2f} {pm} {std:.2f} (n={n})"
    return text + (" †" if deviates else "")


#: One line under every table: what a cell is and what the marks mean.
HOW_TO_READ = ("How to read this: one row per encoder (technique @ pre-training epochs), one column per "
               "evaluation; a cell is one run's score, or mean ± std (n=runs) over seeds; † = the run departs "
               "from the published protocol (listed below); higher is better.")


def _ordered_labels(summary) -> list[str]:
    """Rows by technique, then epochs; the random-initialisation control last, as the reference line."""

    first = summary.drop_duplicates("label")
    first = first.assign(_tech=first["technique"].where(first["technique"] != "", first["label"]),
                         _control=first["technique"] == CONTROL_TECHNIQUE)
    return list(first.sort_values(["_control", "_tech", "epochs", "label"], kind="stable")["label"])


def _columns(summary) -> list[str]:
    """The report columns present, in METRIC_COLUMNS task order (several segmentation datasets: by name)."""
    order = list(METRIC_COLUMNS)
    present = summary.drop_duplicates("column")[["task", "column"]]
    return [c for _, c in sorted(zip(present["task"].map(order.index), present["column"]))]


def pivot(summary, pm: str = "±") -> "pandas.DataFrame":  # noqa: F821
    """Display table: index = technique/checkpoint, columns = the evaluations present, cells from :func:`_cell`."""

    labels = _ordered_labels(summary)
    out = pd.DataFrame(index=pd.Index(labels, name="technique / checkpoint"),
                       columns=_columns(summary), dtype=object).fillna("–")
    for _, s in summary.iterrows():
        out.loc[s["label"], s["column"]] = _cell(s["mean"], s["std"], int(s["n"]), s["deviates"], pm)
    return out


def numeric_pivot(summary) -> "pandas.DataFrame":  # noqa: F821
    """Machine-readable table: per evaluation three columns '<metric> mean', '<metric> std', '<metric> n'."""

    labels = _ordered_labels(summary)
    out = pd.DataFrame(index=pd.Index(labels, name="technique / checkpoint"))
    for name in _columns(summary):
        sub = summary[summary["column"] == name].set_index("label")
        out[f"{name} mean"] = sub["mean"].reindex(labels).round(4)
        out[f"{name} std"] = sub["std"].reindex(labels).round(4)
        out[f"{name} n"] = sub["n"].reindex(labels).astype("Int64")
        out[f"{name} deviates"] = sub["deviates"].reindex(labels).astype("boolean")
    return out


def grouped_deviations(runs, labels: list[str] | None = None, field: str = "deviations") -> list[tuple[str, str]]:
    """Each distinct deviation once, with where it applies: ``[(deviation, "linear top-1, k-NN top-1: all
    rows; fine-tune top-1: mae, ddae"), ...]``: deviations by the first table column they apply to (then in
    order of first appearance), columns in the table's order.

    Columns whose runs deviate alike for the same rows share one entry; "all rows" means every row of the
    table (``labels``, default: every label in ``runs``). ``field``: the column of ``runs`` holding the lists
    grouped (``selections``: what the runs selected, and where).
    """
    if runs.empty:
        return []
    labels = list(labels) if labels is not None else list(dict.fromkeys(runs["label"]))
    where: dict[str, dict[str, set]] = {}
    for _, r in runs.iterrows():
        for dev in dict.fromkeys(r[field]):
            where.setdefault(dev, {}).setdefault(r["column"], set()).add(r["label"])
    order = _columns(summarize(runs))
    out = []
    # the deviations of the first column first, then those only of the second, ...; within that, first seen first
    for dev, columns in sorted(where.items(), key=lambda item: min(order.index(c) for c in item[1])):
        by_rows: dict[tuple, list[str]] = {}
        for column, rows in sorted(columns.items(), key=lambda item: order.index(item[0])):
            by_rows.setdefault(tuple(lab for lab in labels if lab in rows), []).append(column)
        parts = []
        for rows, cols in by_rows.items():
            who = "all rows" if len(rows) == len(labels) else ", ".join(rows)
            parts.append(f"{', '.join(cols)}: {who}")
        out.append((dev, "; ".join(parts)))
    return out


def _notes(runs, problems: list[str], labels: list[str] | None = None) -> list[str]:
    notes = [f"† {dev} ({where})" for dev, where in grouped_deviations(runs, labels)]
    notes += [f"selection: {what} ({where})" for what, where in grouped_deviations(runs, labels, "selections")]
    notes += [f"skipped: {p}" for p in problems]
    return notes


def console_table(dirs, console=None) -> None:
    """Print the report of ``dirs`` to ``console`` (rich): a table sized to the terminal, the how-to-read
    line and the grouped notes. On a console that is not a terminal (output piped or redirected) the
    Markdown text of :func:`write_report` is printed instead, with no colour codes and no box drawing."""

    console = console or Console()
    if not console.is_terminal:
        console.print(write_report(dirs, fmt="md"), markup=False, highlight=False, soft_wrap=True)
        return
    dirs = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
    runs, problems = run_table(dirs)
    summary = summarize(runs)
    if summary.empty:
        console.print("No finished evaluation runs found.")
    else:
        table_df = pivot(summary)
        table = Table(show_lines=False, header_style="bold", expand=False)
        table.add_column(table_df.index.name, no_wrap=False)
        for column in table_df.columns:
            table.add_column(column, justify="right")
        for label, row in table_df.iterrows():
            table.add_row(label, *row.tolist())
        console.print(table)
        console.print(HOW_TO_READ, style="dim", highlight=False)
    for note in _notes(runs, problems, _ordered_labels(summary) if not summary.empty else None):
        console.print(f"- {note}", markup=False, highlight=False)


def _attention_series(table) -> dict[str, list[float]]:
    """Row label -> mean attention distance per block of each finished ``analyze`` record (the last one per label)."""
    column = "metrics.attention_distance_mean"
    if column not in table.columns:
        return {}
    done = table[(table["task"] == "analyze") & (table["status"] == "ok")]
    return {_encoder_row(r)[0]: [float(v) for v in r[column]] for _, r in done.iterrows()
            if isinstance(r[column], list)}


def write_plots(runs, summary, table_path: Path, dirs) -> list[Path]:
    """PNG figures next to ``table_path``: the summary (every encoder per metric, the random control marked),
    metric vs epochs (only when a technique has two or more epoch values), per-class IoU per segment run,
    loss curves."""


    stem, folder = table_path.stem, table_path.parent
    written = []
    if not summary.empty:
        written.append(plots.plot_summary(summary, folder / f"{stem}_summary.png", columns=_columns(summary),
                                          labels=_ordered_labels(summary)))
    if not summary.empty and plots.has_epoch_series(summary):
        columns = _columns(summary)
        written.append(plots.plot_metric_vs_epochs(
            summary.assign(task=summary["column"]), folder / f"{stem}_metric_vs_epochs.png",
            tasks={c: c for c in columns}))
    table, _ = load_records(*dirs)
    attention = _attention_series(table)  # every encoder `mimbench analyze` measured, on one figure
    if attention:
        written.append(plots.plot_attention_distance(attention, folder / f"{stem}_attention_distance.png"))
    iou_cols = [c for c in table.columns if c.startswith(PER_CLASS_PREFIX)]
    if iou_cols:
        for _, r in table[table["task"] == "segment"].iterrows():
            per_class = {c[len(PER_CLASS_PREFIX):]: float(r[c]) for c in iou_cols if not pd.isna(r[c])}
            if per_class:
                # named and titled after the encoder's row in the table (the run id keeps seeds apart)
                label = _encoder_row(r)[0]
                slug = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in label.replace(" @ ", "-"))
                run = Path(r["file"]).stem.rsplit("-", 1)[-1][:8]
                dataset = _column("segment", r.get("dataset.name"))
                written.append(plots.plot_per_class_iou(per_class, folder / f"{stem}_iou_{slug}_{run}.png",
                                                        title=f"{label}: {dataset} per class (run {run})"))
    logs = set()
    for d in dirs:
        d = Path(d)
        if d.is_dir():
            logs.update(p.resolve() for p in d.rglob("log.jsonl"))
    if "encoder.path" in table.columns:
        for enc in table["encoder.path"].dropna():
            candidate = Path(str(enc)).parent / "log.jsonl"
            if candidate.is_file():
                logs.add(candidate.resolve())
    for log in sorted(logs):
        its, _ = plots.read_loss_log(log)
        if its:
            # name a log by its folder path below the given directory (e.g. mae-finetune), so that the logs of
            # several encoders' evaluations do not overwrite each other's figure
            rel = next((log.parent.relative_to(Path(d).resolve()) for d in dirs
                        if log.parent.is_relative_to(Path(d).resolve())), None)
            tag = "-".join(rel.parts) if rel is not None and rel.parts else log.parent.name
            written.append(plots.plot_loss_curve(log, folder / f"{stem}_loss_{tag}.png"))
    return written


def _report_folder(out: str | Path) -> Path:
    """``out`` as a path whose folder exists (made here)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MimbenchError(f"Cannot create the report folder {out.parent}: {e.strerror or e}.",
                            "Give --out a path in a folder you can write to.") from e
    return out


def write_report(dirs, fmt: str = "md", out: str | Path | None = None) -> str:
    """Aggregate the run records under ``dirs`` into a table in ``fmt`` (md | csv | latex | html).

    Returns the text. With ``out``, also writes it there and saves the figures (PNG) next to it;
    their paths are listed at the end of the returned text. Skipped files and deviating runs are
    listed under the table (as '#' comment lines in csv, '%' in latex).
    """
    if fmt not in FORMATS:
        raise MimbenchError(f"Unknown report format {fmt!r}.", f"Use one of {', '.join(FORMATS)}.")
    dirs = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
    runs, problems = run_table(dirs)
    summary = summarize(runs)
    notes = _notes(runs, problems, _ordered_labels(summary) if not summary.empty else None)
    if fmt == "html":
        return _html_page(runs, summary, problems, dirs, out)
    if summary.empty:
        text = {"md": "No finished evaluation runs found.", "csv": "# no finished evaluation runs found",
                "latex": "% no finished evaluation runs found",
                "html": "<p>No finished evaluation runs found.</p>"}[fmt]
    elif fmt == "md":
        text = pivot(summary).to_markdown()
        table13 = robustness.table13(summary, _ordered_labels(summary))
        if table13 is not None:
            text += "\n\nRobustness, laid out as MAE Table 13 (a row per set):\n\n" + table13.to_markdown()
    elif fmt == "csv":
        text = numeric_pivot(summary).to_csv().rstrip("\n")
    elif fmt == "latex":
        table = pivot(summary, pm=r"$\pm$")
        text = table.style.to_latex(hrules=True, column_format="l" + "r" * len(table.columns)).rstrip("\n")
        text = text.replace("†", r"$^\dagger$")
    else:
        text = pivot(summary).to_html(border=0)
    if not summary.empty:
        text += {"md": "\n\n" + HOW_TO_READ, "csv": "\n# " + HOW_TO_READ, "latex": "\n% " + HOW_TO_READ,
                 "html": f"\n<p>{html.escape(HOW_TO_READ)}</p>"}[fmt]
    if notes:
        if fmt == "md":
            text += "\n\n" + "\n".join(f"- {n}" for n in notes)
        elif fmt == "csv":
            text += "\n" + "\n".join(f"# {n}" for n in notes)
        elif fmt == "latex":
            text += "\n" + "\n".join(f"% {n}" for n in notes)
        else:
            text += "\n<ul>\n" + "\n".join(f"<li>{html.escape(n)}</li>" for n in notes) + "\n</ul>"
    if out is not None:
        out = _report_folder(out)
        figures = write_plots(runs, summary, out, dirs)
        if figures:
            if fmt == "html":
                text += "\n" + "\n".join(f'<p><img src="{html.escape(p.name)}"></p>' for p in figures)
            else:
                lead = {"md": "- figure: ", "csv": "# figure: ", "latex": "% figure: "}[fmt]
                # Markdown needs a blank line between the table and a list.
                sep = "\n\n" if fmt == "md" and not notes else "\n"
                text += sep + "\n".join(f"{lead}{p}" for p in figures)
        try:
            atomic_write_text(out, text + "\n", what="the report",
                              fix="Give --out a path in a folder you can write to.")
        except OSError as e:
            raise MimbenchError(f"Cannot write the report to {out}: {e.strerror or e}.",
                                "Give --out a path in a folder you can write to.") from e
    return text


def _html_page(runs, summary, problems, dirs, out) -> str:
    """The self-contained HTML page (:mod:`mimbench.results.html_report`): table, notes and every figure inlined;
    without ``out`` the figures are drawn in a temporary folder."""
    labels = _ordered_labels(summary) if not summary.empty else []
    parts = html_report.ReportParts(
        table=pivot(summary) if not summary.empty else None, summary=summary, runs=runs, how_to_read=HOW_TO_READ,
        problems=problems, selections=grouped_deviations(runs, labels or None, "selections"), dirs=dirs)
    table13 = robustness.table13(summary, labels) if not summary.empty else None
    if table13 is not None:
        parts.layouts.append(("Robustness, laid out as MAE Table 13 (a row per set)", table13))
    if out is None:
        with tempfile.TemporaryDirectory() as tmp:
            parts.figures = write_plots(runs, summary, Path(tmp) / "report.html", dirs)
            return html_report.write_page(parts, None)
    out = _report_folder(out)
    parts.figures = write_plots(runs, summary, out, dirs)
    return html_report.write_page(parts, out)


__all__ = ["FORMATS", "HOW_TO_READ", "METRIC_COLUMNS", "console_table", "grouped_deviations", "lowshot_column",
           "numeric_pivot", "pivot",
           "run_table", "segment_column", "summarize", "write_plots", "write_report"]
