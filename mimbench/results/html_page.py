"""The shell of mimbench's HTML pages: one self-contained document (inline style and script, figures as
``data:`` URIs, a content-security policy that blocks every network request), readable in light and dark
(``prefers-color-scheme``) and on paper (``@media print``), with sortable and filterable tables.

Tables opt in by class: ``<table class="sortable">`` sorts on a header click (by each cell's ``data-sort``
number when it has one, else its text; a second click reverses); rows with ``data-<name>`` attributes are
shown or hidden by ``<select class="filter" data-key="<name>">`` controls, and a ``<section class="group">``
whose rows are all hidden is hidden with them. The only links that leave the page are ``<a href>`` to sources.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

#: Nothing the page loads may come from the network: images only from data: URIs, style and script inline.
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")

STYLE = """
:root { color-scheme: light dark; --fg: #1b1f24; --bg: #ffffff; --muted: #57606a; --line: #d0d7de;
  --head: #f3f5f7; --accent: #0a58ca; --mark: #fff4d6; --own: #e3f1ff; --control: #eeeeee; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6edf3; --bg: #0d1117; --muted: #9aa4ae; --line: #30363d; --head: #161b22;
    --accent: #6cb6ff; --mark: #3a2f0b; --own: #0f2a47; --control: #262b31; }
}
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg);
  margin: 0 auto; padding: 1.5rem; max-width: 78rem; }
a { color: var(--accent); }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05rem; } .muted, caption { color: var(--muted); font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid var(--line); padding: 0.3rem 0.55rem; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
thead th { background: var(--head); position: sticky; top: 0; }
table.sortable thead th { cursor: pointer; user-select: none; }
th[aria-sort="ascending"]::after { content: " \\25B2"; } th[aria-sort="descending"]::after { content: " \\25BC"; }
tr.control { background: var(--control); font-style: italic; }
tr.own { background: var(--own); font-weight: 600; }
.badge { display: inline-block; font-size: 0.75em; padding: 0 0.35rem; border: 1px solid var(--muted);
  border-radius: 0.6rem; color: var(--muted); font-style: normal; font-weight: normal; margin-left: 0.3rem; }
.badge.warn { background: var(--mark); color: var(--fg); }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.1rem 1rem; margin: 0.3rem 0; }
dt { color: var(--muted); } dd { margin: 0; overflow-wrap: anywhere; }
figure { margin: 0.8rem 0; } figure img { max-width: 100%; height: auto; background: #fff; border-radius: 4px; }
figcaption { color: var(--muted); font-size: 0.9em; }
article, .detail { border-left: 3px solid var(--line); padding-left: 0.8rem; margin: 1rem 0; }
:target { outline: 2px solid var(--accent); outline-offset: 4px; }
nav a, nav strong { margin-right: 0.8rem; } .filters label { margin-right: 1rem; }
ul.skipped li { color: var(--muted); overflow-wrap: anywhere; }
@media print {
  body { max-width: none; padding: 0; font-size: 11pt; color: #000; background: #fff; }
  nav, .filters, .noprint { display: none !important; }
  thead th { position: static; } a { color: #000; text-decoration: none; }
  section, article, figure, table { break-inside: avoid; } h2 { break-after: avoid; }
  tr.own, tr.control { background: none; }
}
"""

SCRIPT = """
(function () {
  function key(cell) {
    var n = cell.getAttribute('data-sort');
    return n === null || n === '' ? null : parseFloat(n);
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('thead th').forEach(function (th, col) {
      th.addEventListener('click', function () {
        var down = th.getAttribute('aria-sort') !== 'descending';
        table.querySelectorAll('thead th').forEach(function (o) { o.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', down ? 'descending' : 'ascending');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[col], y = b.cells[col], kx = key(x), ky = key(y), r;
          if (kx === null && ky === null) { r = x.textContent.localeCompare(y.textContent); }
          else if (kx === null) { return 1; } else if (ky === null) { return -1; }
          else { r = kx - ky; }
          return down ? -r : r;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
  var filters = document.querySelectorAll('select.filter');
  function apply() {
    document.querySelectorAll('tr[data-arch]').forEach(function (row) {
      var show = true;
      filters.forEach(function (f) {
        if (f.value && row.getAttribute('data-' + f.getAttribute('data-key')) !== f.value) { show = false; }
      });
      row.hidden = !show;
    });
    document.querySelectorAll('section.group').forEach(function (s) {
      s.hidden = s.querySelectorAll('tbody tr:not([hidden])').length === 0;
    });
  }
  filters.forEach(function (f) { f.addEventListener('change', apply); });
})();
"""


def esc(value) -> str:
    """Text (or anything printable) escaped for HTML content and attribute values."""
    return html.escape(str(value), quote=True)


def slug(text: str) -> str:
    """An id-safe form of ``text`` (letters, digits, ``-``)."""
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "x"


def document(title: str, body: str) -> str:
    """A whole HTML document around ``body``: the style, the sort/filter script and the network-blocking policy."""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<link rel=\"icon\" href=\"data:,\">\n"
            f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n"
            f"<script>{SCRIPT}</script>\n</body>\n</html>\n")


def png_figure(path: str | Path, caption: str, *, fig_id: str) -> str:
    """``<figure>`` with the PNG at ``path`` inlined as a data: URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f"<figure id=\"{esc(fig_id)}\"><img alt=\"{esc(caption)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def definitions(items) -> str:
    """``<dl>`` of (name, value) pairs; empty values are left out."""
    rows = [(k, v) for k, v in items if v not in (None, "", [], {})]
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows) + "</dl>" if rows else ""


def flat(value, prefix: str = "") -> list[tuple[str, object]]:
    """A nested dict as (dotted key, leaf) pairs; lists of scalars joined by ', '."""
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in flat(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list)) for v in value):
        return [(prefix, ", ".join(str(v) for v in value))]
    return [(prefix, value)]


def skipped_list(problems: list[str]) -> str:
    """The section naming every input left out, and why; empty when nothing was."""
    if not problems:
        return ""
    items = "".join(f"<li>skipped: {esc(p)}</li>" for p in problems)
    return (f"<section id=\"skipped\"><h2>Skipped inputs ({len(problems)})</h2>"
            f"<ul class=\"skipped\">{items}</ul></section>")
