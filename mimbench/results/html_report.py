"""``mimbench report --format html``: the report as one self-contained page.

The page holds the summary table (columns sortable, the random-initialisation control marked, each row
linking to its encoder and each cell to its runs), the deviations grouped per column, the inputs that were
skipped, and every figure of the report inlined as PNG: the summary and metric-vs-epochs figures at the
top, each pre-training loss curve with its encoder, each run's own training loss curve and per-class IoU
with that run. A run's detail shows its config (protocol, overrides), provenance (record file, times,
versions, code commit), hardware and precision, and its deviations.

:mod:`mimbench.results.report` computes the table and figures and hands them over as :class:`ReportParts`;
this module only lays them out (:mod:`mimbench.results.html_page` is the page shell).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mimbench.atomic import atomic_write_text
from mimbench.errors import MimbenchError
from mimbench.results.html_page import definitions, document, esc, flat, png_figure, skipped_list, slug
from mimbench.results.plots import CONTROL_TECHNIQUE


@dataclass
class ReportParts:
    """What the report computed: ``table`` (display cells, one row per encoder label; None when empty),
    ``summary`` and ``runs`` (:func:`mimbench.results.report.summarize` / ``run_table``), the grouped
    ``selections`` notes, the ``problems`` (skipped inputs), the how-to-read line, the figures written
    (``<stem>_*.png``) and the directories the records came from (to place the loss curves)."""

    table: object
    summary: object
    runs: object
    how_to_read: str
    problems: list[str] = field(default_factory=list)
    selections: list[tuple[str, str]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)
    # (title, DataFrame) shown under the summary, e.g. the robustness cells laid out as MAE Table 13
    layouts: list[tuple[str, object]] = field(default_factory=list)


def _cell_id(label: str, column: str) -> str:
    return f"cell-{slug(label)}--{slug(column)}"


def _read(file: str) -> dict:
    # the record was validated by load_records a moment ago; a file changed since reads as empty
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _loss_tag(log: Path, dirs) -> str:
    """The name part ``write_plots`` gives the loss figure of ``log``: its folder below the given directory."""
    rel = next((log.parent.relative_to(Path(d).resolve()) for d in dirs
                if log.parent.is_relative_to(Path(d).resolve())), None)
    return "-".join(rel.parts) if rel is not None and rel.parts else log.parent.name


class _Figures:
    """The report's figures by what they show; each is placed on the page once (``take``)."""

    def __init__(self, figures, dirs):
        self.by_name = {Path(p).name: Path(p) for p in figures}
        self.stem = Path(figures[0]).name.split("_", 1)[0] if figures else ""
        self.dirs, self.placed = list(dirs), set()

    def loss(self, log: Path) -> Path | None:
        log = log.resolve()
        return self.by_name.get(f"{self.stem}_loss_{_loss_tag(log, self.dirs)}.png") if log.is_file() else None

    def iou(self, run_id: str) -> Path | None:
        return next((p for n, p in self.by_name.items()
                     if n.startswith(f"{self.stem}_iou_") and n.endswith(f"_{run_id[:8]}.png")), None)

    def take(self, path: Path | None, caption: str) -> str:
        """The inlined figure the first time it is asked for, a link to it afterwards; '' for None."""
        if path is None:
            return ""
        fig_id = f"fig-{slug(path.stem)}"
        if path.name in self.placed:
            return f"<p><a href=\"#{fig_id}\">{esc(caption)}</a> (shown above)</p>"
        self.placed.add(path.name)
        return png_figure(path, caption, fig_id=fig_id)

    def rest(self) -> list[Path]:
        return [p for n, p in self.by_name.items() if n not in self.placed]


def _summary_table(parts: ReportParts) -> str:
    table, summary = parts.table, parts.summary
    technique = dict(zip(summary["label"], summary["technique"]))
    stats = {(s["label"], s["column"]): s for _, s in summary.iterrows()}
    deviating = set(summary.loc[summary["deviates"], "column"])
    head = [f"<th scope=\"col\">{esc(table.index.name)}</th>"]
    for column in table.columns:
        mark = f" <a href=\"#dev-{slug(column)}\" title=\"deviations\">†</a>" if column in deviating else ""
        head.append(f"<th scope=\"col\">{esc(column)}{mark}</th>")
    body = []
    for label, row in table.iterrows():
        control = technique.get(label) == CONTROL_TECHNIQUE
        badge = " <span class=\"badge\">control: no pre-training</span>" if control else ""
        cells = [f"<th scope=\"row\"><a href=\"#row-{slug(label)}\">{esc(label)}</a>{badge}</th>"]
        for column, text in row.items():
            s = stats.get((label, column))
            if s is None:
                cells.append(f"<td class=\"num\" data-sort=\"\">{esc(text)}</td>")
            else:
                cells.append(f"<td class=\"num\" data-sort=\"{float(s['mean']):.6g}\">"
                             f"<a href=\"#{_cell_id(label, column)}\">{esc(text)}</a></td>")
        body.append(("<tr class=\"control\">" if control else "<tr>") + "".join(cells) + "</tr>")
    return (f"<table class=\"sortable\" id=\"summary\"><caption>Click a column header to sort; click a cell for its "
            f"runs.</caption><thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"<p class=\"muted\">{esc(parts.how_to_read)}</p>")


def _who(rows: list[str], labels: list[str]) -> str:
    """Where a deviation applies, as the Markdown report says it: "all rows" of the table, or the rows named."""
    return "all rows" if len(rows) == len(labels) else ", ".join(rows)


def _deviations(parts: ReportParts) -> str:
    """One block per column: each distinct deviation of its runs once, with the rows it applies to."""
    runs, labels = parts.runs, list(parts.table.index)
    blocks = []
    for column in parts.table.columns:
        where: dict[str, list[str]] = {}
        for _, r in runs[runs["column"] == column].iterrows():
            for dev in dict.fromkeys(r["deviations"]):
                rows = where.setdefault(dev, [])
                if r["label"] not in rows:
                    rows.append(r["label"])
        if not where:
            continue
        items = "".join(f"<li>{esc(dev)} <span class=\"muted\">({esc(_who(rows, labels))})</span></li>"
                        for dev, rows in where.items())
        blocks.append(f"<div id=\"dev-{slug(column)}\"><h3>{esc(column)}</h3><ul>{items}</ul></div>")
    selections = "".join(f"<li>{esc(what)} <span class=\"muted\">({esc(w)})</span></li>"
                         for what, w in parts.selections)
    if selections:
        blocks.append(f"<div id=\"selections\"><h3>What the runs selected, and where</h3><ul>{selections}</ul></div>")
    if not blocks:
        return ""
    return ("<section id=\"deviations\"><h2>Deviations from the published protocols (†)</h2>"
            "<p class=\"muted\">A marked cell is not comparable to published numbers.</p>" + "".join(blocks)
            + "</section>")


def _run_detail(file: str, rows, record: dict, figures: _Figures) -> str:
    """One run: its numbers, config, provenance, hardware and precision, deviations and its own figures."""
    first = rows.iloc[0]
    protocol = {k: v for k, v in (record.get("protocol") or {}).items() if k not in ("deviations", "runs")}
    seeds = ", ".join(f"seed {s}: {v:.2f}" for s, v in zip(rows["seed"], rows["value"]))
    devs = "".join(f"<li>{esc(d)}</li>" for d in first["deviations"]) or "<li>none: the published protocol</li>"
    run_id = str(record.get("run_id", Path(file).stem))
    provenance = [("record", file), ("started", record.get("started")), ("duration (s)", record.get("duration_s")),
                  ("seed", record.get("seed")), *flat(record.get("dataset") or {}, "dataset"),
                  *flat(record.get("versions") or {}, "versions")]
    metrics = [(k, v) for k, v in flat(record.get("metrics") or {}) if not k.startswith("per_class_iou.")]
    own_log = figures.loss(Path(file).parent / "log.jsonl")
    return (f"<article id=\"run-{esc(run_id)}\"><h4>run {esc(run_id[:8])} <span class=\"muted\">({esc(seeds)})</span>"
            f"</h4><h5>config</h5>{definitions(flat(protocol))}<h5>deviations</h5><ul>{devs}</ul>"
            f"<h5>provenance</h5>{definitions(provenance)}"
            f"<h5>hardware and precision</h5>{definitions(flat(record.get('hardware') or {}))}"
            f"<h5>metrics</h5>{definitions(metrics)}"
            + figures.take(own_log, f"training loss of run {run_id[:8]} ({first['column']})")
            + figures.take(figures.iou(run_id), f"per-class IoU of run {run_id[:8]}") + "</article>")


def _runs_section(parts: ReportParts, figures: _Figures) -> str:
    """Per encoder row: its encoder and pre-training loss curve, then each of its cells' runs."""
    out = ["<section id=\"runs\"><h2>Encoders and runs</h2>"]
    runs = parts.runs
    for label in parts.table.index:
        mine = runs[runs["label"] == label]
        records = {f: _read(f) for f in dict.fromkeys(mine["file"])}
        encoder = next((r.get("encoder") for r in records.values() if r.get("encoder")), {}) or {}
        pre_log = Path(str(encoder.get("path", ""))).parent / "log.jsonl" if encoder.get("path") else None
        out.append(f"<div class=\"detail\" id=\"row-{slug(label)}\"><h3>{esc(label)}</h3>"
                   f"{definitions(flat(encoder, 'encoder'))}"
                   + (figures.take(figures.loss(pre_log), f"pre-training loss of {label}") if pre_log else ""))
        for column in parts.table.columns:
            cell = mine[mine["column"] == column]
            if cell.empty:
                continue
            out.append(f"<section id=\"{_cell_id(label, column)}\"><h4>{esc(label)} · {esc(column)} "
                       f"<span class=\"muted\">({len(cell)} run{'s' if len(cell) > 1 else ''})</span></h4>")
            out += [_run_detail(f, cell[cell["file"] == f], records[f], figures) for f in dict.fromkeys(cell["file"])]
            out.append("</section>")
        out.append("</div>")
    return "".join(out) + "</section>"


def render(parts: ReportParts) -> str:
    """The whole page as text."""
    figures = _Figures(parts.figures, parts.dirs)
    nav = ["<a href=\"#summary\">table</a>", "<a href=\"#deviations\">deviations</a>",
           "<a href=\"#figures\">figures</a>", "<a href=\"#runs\">encoders and runs</a>"]
    nav += ["<a href=\"#skipped\">skipped</a>"] if parts.problems else []
    body = ["<header><h1>mimbench report</h1>",
            f"<p class=\"muted\">Records from {esc(', '.join(str(d) for d in parts.dirs))}</p>"
            f"<nav class=\"noprint\">{' '.join(nav)}"
            "</nav></header>"]
    if parts.table is None or parts.summary.empty:
        body.append("<p id=\"summary\">No finished evaluation runs found.</p>")
        body.append(skipped_list(parts.problems))
        rest = figures.rest()
    else:
        body.append("<h2>Summary</h2>" + _summary_table(parts))
        body += [f"<section class=\"layout\"><h2>{esc(title)}</h2>{frame.to_html(border=0, classes='sortable')}"
                 "</section>" for title, frame in parts.layouts]
        body.append(_deviations(parts))
        body.append(skipped_list(parts.problems))
        top = [p for p in figures.rest() if "_loss_" not in p.name and "_iou_" not in p.name]
        top_html = "".join(figures.take(p, p.stem.split("_", 1)[-1].replace("_", " ")) for p in top)
        runs_html = _runs_section(parts, figures)
        rest = figures.rest()
        body.append(f"<section id=\"figures\"><h2>Figures</h2>{top_html}</section>{runs_html}")
    if rest:  # loss curves of logs that belong to no run in the table (a pre-training folder given as input)
        body.append("<section id=\"other-figures\"><h2>Other figures</h2>"
                    + "".join(figures.take(p, p.stem.split("_", 1)[-1].replace("_", " ")) for p in rest) + "</section>")
    return document("mimbench report", "\n".join(b for b in body if b))


def write_page(parts: ReportParts, out: str | Path | None) -> str:
    """Render the page, write it to ``out`` (when given), name the skipped inputs on stderr; return the text."""
    text = render(parts)
    for problem in parts.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    if out is not None:
        try:
            atomic_write_text(Path(out), text, what="the report",
                              fix="Give --out a path in a folder you can write to.")
        except OSError as e:
            raise MimbenchError(f"Cannot write the report to {out}: {e.strerror or e}.",
                                "Give --out a path in a folder you can write to.") from e
    return text
