"""``mimbench leaderboard --html DIR``: the published results and the user's runs as a small static site.

One page per evaluation task (the task table, :func:`mimbench.evals.tasks.all_tasks`, plus any leaderboard task
no entry of it maps to) and an index. A page has one table per protocol: numbers are comparable only within
a protocol and architecture, as ``mimbench compare`` enforces, so rows are ranked within (protocol,
architecture) and a run of the user's that deviates from the published protocol sits under its own
protocol, marked not comparable. Published rows show their source (repositories and arXiv papers linked),
protocol, architecture and whether the number was verified against the source. Rows can be filtered by
architecture and protocol; the user's runs are highlighted. Every page is self-contained
(:mod:`mimbench.results.html_page`): it opens from disk or any static host.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd

from mimbench.atomic import atomic_write_text
from mimbench.errors import MimbenchError
from mimbench.evals import robustness
from mimbench.evals.tasks import all_tasks
from mimbench.results.html_page import document, esc, skipped_list, slug
from mimbench.results.leaderboard import (LOWER_IS_BETTER, RECORD_TASK, TASK_METRIC, field_text, load_leaderboard,
                                          normalize_arch, record_metric, run_deviations, standard_protocol)
from mimbench.results.records import load_records

_REPO = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)\s+\S*[./]")
#: The robustness sets the leaderboard has rows for (MAE Table 13 at 224): a run on one of them, as
#: ``eval robustness`` names it in ``protocol.set``, is ranked under that protocol.
ROBUSTNESS_PROTOCOLS = ("in-c", "in-a", "in-r", "sketch")
_ARXIV = re.compile(r"arXiv[: ]\s*(\d{4}\.\d{4,5})")


def source_html(source: str) -> str:
    """A source as text with links: a leading ``owner/repo path`` to its GitHub repository, each arXiv id to its
    abstract page; the rest stays text."""
    parts = []
    for part in str(source).split(";"):
        text = esc(part)
        m = _REPO.match(part.strip())
        if m:
            repo = m.group(1)
            text = text.replace(esc(repo), f"<a href=\"https://github.com/{esc(repo)}\">{esc(repo)}</a>", 1)
        text = _ARXIV.sub(lambda a: f"<a href=\"https://arxiv.org/abs/{a.group(1)}\">{a.group(0)}</a>", text)
        parts.append(text)
    return ";".join(parts)


def site_tasks(board) -> dict[str, str]:
    """Page name -> the leaderboard task its published rows have: every task of the task table, then the
    leaderboard's tasks that no entry maps to (``RECORD_TASK``)."""
    pages = {t.name: RECORD_TASK.get(t.name, t.name) for t in all_tasks()}
    for task in dict.fromkeys(board["task"]):
        if task not in pages.values():
            pages[task] = task
    return pages


def _own_row(r, board_task: str) -> dict:
    """A user's run as a site row: comparable (under the standard protocol) only without deviations."""
    epochs = pd.to_numeric(r.get("encoder.epochs"), errors="coerce")
    technique = field_text(r.get("encoder.technique")) or Path(field_text(r.get("encoder.path"))).stem
    deviations = run_deviations(r)
    standard = standard_protocol(board_task, field_text(r.get("protocol.head_preset"))) \
        if board_task in TASK_METRIC else None
    value = record_metric(r, board_task)
    if board_task == "robustness":  # one record per set: MAE Table 13's sets are protocols of their own
        found = robustness.report_value(r)
        value = None if found is None else found[1]
        name = field_text(r.get("protocol.set"))
        standard = name if name in ROBUSTNESS_PROTOCOLS and field_text(r.get("dataset.name")) != "fashion-mnist-c" \
            else None
    comparable = not deviations and standard is not None
    return {"method": technique, "arch": normalize_arch(field_text(r.get("encoder.arch"))),
            "pretrain_epochs": int(epochs) if not pd.isna(epochs) and epochs > 0 else pd.NA,
            "value": value, "notes": "; ".join(deviations),
            "protocol": standard if comparable else (field_text(r.get("protocol.name")) or "unnamed protocol"),
            "source": str(r["file"]), "verified": "your run", "own": True, "comparable": comparable}


def user_rows(dirs, pages: dict[str, str]) -> tuple[dict[str, list[dict]], list[str]]:
    """The finished runs under ``dirs`` per page (a low-shot summary counts once, not its per-run records),
    and what was skipped."""
    if not dirs:
        return {}, []
    table, problems = load_records(*dirs)
    rows: dict[str, list[dict]] = {}
    for _, r in table.iterrows():
        if r["task"] not in pages:
            continue
        if r["status"] != "ok":
            problems.append(f"{r['file']}: status {r['status']}; not shown")
            continue
        if r["task"] == "lowshot" and not isinstance(r.get("protocol.runs"), list):
            continue  # a run of a low-shot summary: its number is in the summary
        row = _own_row(r, pages[r["task"]])
        if row["value"] is None:
            problems.append(f"{r['file']}: no headline metric; not shown")
            continue
        rows.setdefault(r["task"], []).append(row)
    return rows, problems


def _row_html(r, rank) -> str:
    epochs = "" if pd.isna(r["pretrain_epochs"]) else str(int(r["pretrain_epochs"]))
    own = bool(r.get("own"))
    verified = str(r["verified"])
    mark = {"unverified": " <span class=\"badge warn\">unverified</span>",
            "your run": " <span class=\"badge\">your run</span>"}.get(verified, "")
    if own and not r.get("comparable"):
        mark += " <span class=\"badge warn\">not comparable</span>"
    source = (f"<span title=\"{esc(r['source'])}\">{esc(Path(r['source']).name)}</span>" if own
              else source_html(r["source"]))
    cells = [f"<td class=\"num\" data-sort=\"{rank}\">{rank}</td>", f"<td>{esc(r['method'])}{mark}</td>",
             f"<td>{esc(r['arch'])}</td>", f"<td class=\"num\" data-sort=\"{epochs}\">{epochs}</td>",
             f"<td class=\"num\" data-sort=\"{float(r['value']):.6g}\">{float(r['value']):.2f}</td>",
             f"<td>{esc(r['notes'])}</td>", f"<td>{source}</td>", f"<td>{esc(verified)}</td>"]
    cls = " class=\"own\"" if own else ""
    return (f"<tr{cls} data-arch=\"{esc(r['arch'])}\" data-protocol=\"{esc(r['protocol'])}\">"
            + "".join(cells) + "</tr>")


def _protocol_section(protocol: str, rows) -> str:
    """One table: the rows of one protocol, best first within each architecture (an error such as mCE: lowest
    first), ranked there."""
    lower = "metric" in rows and rows["metric"].isin(LOWER_IS_BETTER).any()
    rows = rows.sort_values(["arch", "value"], ascending=[True, bool(lower)], kind="stable")
    body, rank, arch = [], 0, None
    for _, r in rows.iterrows():
        rank = 1 if r["arch"] != arch else rank + 1
        arch = r["arch"]
        body.append(_row_html(r, rank))
    published = int((~rows["own"]).sum())
    note = (f"{published} published row(s); ranks count within one architecture" if published else
            "no published rows under this protocol: these runs are not comparable to any published number")
    head = "".join(f"<th scope=\"col\">{h}</th>" for h in
                   ("# in arch", "method", "arch", "pre-train ep", "value", "notes", "source", "verified"))
    return (f"<section class=\"group\" id=\"protocol-{slug(protocol)}\" data-protocol=\"{esc(protocol)}\">"
            f"<h2>{esc(protocol)}</h2><p class=\"muted\">{note}</p><table class=\"sortable\"><thead><tr>{head}"
            f"</tr></thead><tbody>{''.join(body)}</tbody></table></section>")


def _filters(rows) -> str:
    def select(key, label, values):
        options = "".join(f"<option value=\"{esc(v)}\">{esc(v)}</option>" for v in values)
        return (f"<label>{label} <select class=\"filter\" data-key=\"{key}\" id=\"filter-{key}\">"
                f"<option value=\"\">all</option>{options}</select></label>")
    return ("<p class=\"filters\">" + select("arch", "architecture", sorted(set(rows["arch"])))
            + select("protocol", "protocol", list(dict.fromkeys(rows["protocol"]))) + "</p>")


def _nav(pages: dict[str, str], current: str) -> str:
    links = ["<a href=\"index.html\">index</a>"] + [
        (f"<strong>{esc(p)}</strong>" if p == current else f"<a href=\"{esc(p)}.html\">{esc(p)}</a>") for p in pages]
    return f"<nav>{' '.join(links)}</nav>"


def task_page(page: str, published, own: list[dict], pages: dict[str, str], problems: list[str]) -> str:
    """The page of one task: filters, one table per protocol (published protocols first), what was skipped."""
    rows = published.assign(own=False, comparable=True)
    if own:
        rows = pd.concat([rows, pd.DataFrame(own)], ignore_index=True)
    summary = {t.name: t.summary for t in all_tasks()}.get(page, f"published {page} results")
    body = [_nav(pages, page), f"<h1>{esc(page)}</h1><p class=\"muted\">{esc(summary)}</p>",
            "<p>Numbers are comparable only within one protocol and architecture (as <code>mimbench compare</code> "
            "enforces); highlighted rows are your runs.</p>"]
    if rows.empty:
        body.append("<p id=\"empty\">No published results and no runs of yours for this task yet.</p>")
    else:
        body.append(_filters(rows))
        # protocols with published rows first, then those only the user's runs have
        only_own = rows.groupby("protocol", sort=False)["own"].all()
        order = sorted(dict.fromkeys(rows["protocol"]), key=lambda p: bool(only_own[p]))
        body += [_protocol_section(p, rows[rows["protocol"] == p]) for p in order]
    body.append(skipped_list(problems))
    return document(f"mimbench leaderboard: {page}", "\n".join(b for b in body if b))


def _index(pages: dict[str, str], counts: dict[str, tuple[int, int]], problems: list[str]) -> str:
    summary = {t.name: t.summary for t in all_tasks()}
    items = "".join(f"<tr><td><a href=\"{esc(p)}.html\">{esc(p)}</a></td><td>{esc(summary.get(p, ''))}</td>"
                    f"<td class=\"num\" data-sort=\"{counts[p][0]}\">{counts[p][0]}</td>"
                    f"<td class=\"num\" data-sort=\"{counts[p][1]}\">{counts[p][1]}</td></tr>" for p in pages)
    body = (f"{_nav(pages, 'index')}<h1>mimbench leaderboard</h1><p>Published results of masked-image-modelling "
            "encoders with their sources, and your runs among them, one page per evaluation task.</p>"
            "<table class=\"sortable\" id=\"tasks\"><thead><tr><th>task</th><th>what it measures</th>"
            "<th>published rows</th>"
            f"<th>your runs</th></tr></thead><tbody>{items}</tbody></table>{skipped_list(problems)}")
    return document("mimbench leaderboard", body)


def write_site(out_dir: str | Path, include_runs=None) -> list[Path]:
    """Write ``index.html`` and one page per task into ``out_dir``; return their paths. ``include_runs``: folders
    (or record files) of the user's runs. What was skipped is listed on every page and on stderr."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MimbenchError(f"Cannot create the site folder {out_dir}: {e.strerror or e}.",
                            "Give --html a folder you can write to.") from e
    board = load_leaderboard().assign(own=False)
    pages = site_tasks(board)
    dirs = [include_runs] if isinstance(include_runs, (str, Path)) else list(include_runs or [])
    own, problems = user_rows(dirs, pages)
    written, counts = [], {}
    for page, board_task in pages.items():
        published = board[board["task"] == board_task]
        counts[page] = (len(published), len(own.get(page, [])))
        text = task_page(page, published, own.get(page, []), pages, problems)
        written.append(_write(out_dir / f"{page}.html", text))
    written.insert(0, _write(out_dir / "index.html", _index(pages, counts, problems)))
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    return written


def _write(path: Path, text: str) -> Path:
    atomic_write_text(path, text, what="the leaderboard page", fix="Give --html a folder you can write to.")
    return path
