"""The HTML report and the leaderboard site as files: self-contained, every link resolving, the right rows."""
import base64
import json
import re

from typer.testing import CliRunner

from mimbench.cli import app
from mimbench.results.html_site import site_tasks, source_html, write_site
from mimbench.results.leaderboard import RECORD_TASK, load_leaderboard
from mimbench.results.report import write_report
from mimbench.evals.tasks import all_tasks


PNG = base64.b64encode(b"\x89PNG\r\n").decode()  # the start of every inlined PNG


def _rows(text: str, table_id: str) -> list[str]:
    body = re.search(rf'<table[^>]*id="{table_id}".*?<tbody>(.*?)</tbody>', text, re.S).group(1)
    return re.findall(r"<tr[^>]*>.*?</tr>", body, re.S)


def test_report_page_is_self_contained_and_every_figure_is_inlined_once(study, tmp_path, capsys, page_refs):
    out = tmp_path / "site" / "report.html"
    text = write_report([study], fmt="html", out=out)
    assert out.read_text() == text and text.startswith("<!DOCTYPE html>") and "</html>" in text
    figures = sorted(out.parent.glob("report_*.png"))
    # summary, 3 per-class IoU (one per segment run), 2 pre-training and 1 fine-tuning loss curves
    assert len(figures) == 7
    for f in figures:
        assert text.count(base64.b64encode(f.read_bytes()).decode()) == 1, f.name
    assert text.count(f'src="data:image/png;base64,{PNG}') == 7
    res = page_refs.of(text)
    assert res.network() == []
    assert not [v for t, a, v in res.refs if a == "src" and not v.startswith("data:")]
    # every in-page link lands on an element of the page
    targets = [v[1:] for t, a, v in res.refs if a == "href" and v.startswith("#")]
    assert targets and set(targets) <= res.ids
    assert "prefers-color-scheme: dark" in text and "@media print" in text
    err = capsys.readouterr().err
    assert err.count("skipped:") == 2 and "not valid JSON" in err and "no valid schema_version" in err


def test_report_table_rows_control_cells_and_run_details(study, tmp_path):
    text = write_report([study], fmt="html", out=tmp_path / "r.html")
    rows = _rows(text, "summary")
    assert len(rows) == 3  # one per encoder
    assert 'class="control"' in rows[-1] and "random-init" in rows[-1] and "control: no pre-training" in rows[-1]
    assert sum('class="control"' in r for r in rows) == 1
    # the two linear seeds of mae: mean 70.5, the sort key is the mean
    mae = next(r for r in rows if "mae @ 800 ep" in r)
    assert 'data-sort="70.5"' in mae and "70.50 ± 0.71 (n=2)" in mae
    cell = re.search(r'id="cell-mae-800-ep--linear-top-1".*?</section>', text, re.S).group(0)
    assert cell.count("<article") == 2 and "seed 1: 71.00" in cell
    assert "<dt>precision</dt><dd>bf16</dd>" in cell and "versions.torch" in cell and "linear/std" in cell
    finetune = re.search(r'id="cell-mae-800-ep--fine-tune-top-1".*?</section>', text, re.S).group(0)
    assert "training loss of run" in finetune and "data:image/png" in finetune  # its own log, inlined there
    segment = re.search(r'id="cell-ddae-100-ep--ade20k-miou".*?</section>', text, re.S).group(0)
    assert "per-class IoU of run" in segment and "data:image/png" in segment
    encoder = re.search(r'id="row-ddae-100-ep".*?<section', text, re.S).group(0)
    assert "pre-training loss of ddae @ 100 ep" in encoder


def test_report_deviations_are_grouped_per_column(study, tmp_path):
    text = write_report([study], fmt="html", out=tmp_path / "r.html")
    linear = re.search(r'id="dev-linear-top-1">(.*?)</div>', text, re.S).group(1)
    assert linear.count("<li>") == 1 and "fast linear probe: 5 epochs" in linear and "(random-init)" in linear
    finetune = re.search(r'id="dev-fine-tune-top-1">(.*?)</div>', text, re.S).group(1)
    assert finetune.count("<li>") == 1 and "demo scale" in finetune and "all rows" in finetune
    assert 'id="dev-k-nn-top-1"' not in text  # no k-NN run deviates
    assert text.count("fast linear probe: 5 epochs") == 1 + 2  # the column's note, then each of its two runs


def test_empty_and_mixed_directories_still_write_a_page_naming_what_was_skipped(tmp_path, capsys, record_writer):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = write_report([empty], fmt="html", out=tmp_path / "e.html")
    assert (tmp_path / "e.html").is_file() and "No finished evaluation runs found." in text
    assert "skipped: " + str(empty) in text and "no run records" in capsys.readouterr().err
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / ("knn-" + "3" * 32 + ".json")).write_text('{"run_id": ')
    (mixed / ("linear-" + "4" * 32 + ".json")).write_text('{"accuracy": 0.9, "model": "other tool"}')
    record_writer(mixed, "knn", 55.0, technique="mae", epochs=1.0)
    text = write_report([mixed], fmt="html", out=tmp_path / "m.html")
    assert len(_rows(text, "summary")) == 1
    assert text.count("<li>skipped: ") == 2 and capsys.readouterr().err.count("skipped: ") == 2


def test_report_cli_writes_the_page_and_prints_where(study, tmp_path):
    out = tmp_path / "r" / "report.html"
    result = CliRunner().invoke(app, ["report", str(study), "--format", "html", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"report written to {out}" in result.output and "base64" not in result.output
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_site_has_a_page_per_task_with_every_published_row(study, tmp_path, page_refs):
    board = load_leaderboard()
    pages = write_site(tmp_path / "site", include_runs=[study])
    names = [p.stem for p in pages]
    assert names[0] == "index"
    # every task of the table has its page, and every leaderboard task is on one
    assert set(names[1:]) >= {t.name for t in all_tasks()}
    assert set(board["task"]) <= {RECORD_TASK.get(n, n) for n in names[1:]}
    for page, task in site_tasks(board).items():
        text = (tmp_path / "site" / f"{page}.html").read_text()
        published = board[board["task"] == task]
        assert text.count("<tr data-arch=") == len(published), page
        assert text.count("unverified</span>") == int((published["verified"] == "unverified").sum())
        assert page_refs.of(text).network() == []
        hrefs = [v for t, a, v in page_refs.of(text).refs if a == "href" and v.startswith("http")]
        assert all(v.startswith(("https://github.com/", "https://arxiv.org/abs/")) for v in hrefs)


def test_site_highlights_own_runs_under_their_protocol(study, tmp_path):
    write_site(tmp_path / "site", include_runs=[study])
    linear = (tmp_path / "site" / "linear.html").read_text()
    own = re.findall(r'<tr class="own"[^>]*>.*?</tr>', linear, re.S)
    assert len(own) == 6  # 3 encoders x 2 seeds
    # comparable runs sit in the published protocol's table; the deviating control is under its own protocol
    standard = re.search(r'data-protocol="IN-1k linear probe 224">.*?</section>', linear, re.S).group(0)
    assert standard.count('<tr class="own"') == 4 and "not comparable" not in standard
    control = re.search(r'data-protocol="linear/std">.*?</section>', linear, re.S).group(0)
    assert control.count('<tr class="own"') == 2 and control.count("not comparable</span>") == 2
    assert "no published rows under this protocol" in control
    assert 'id="filter-arch"' in linear and 'id="filter-protocol"' in linear
    finetune = (tmp_path / "site" / "finetune.html").read_text()
    assert finetune.count("not comparable</span>") == 3  # built-in data: demo scale, for every encoder
    assert "skipped: " in linear and "not valid JSON" in linear


def test_sources_link_repositories_and_arxiv_only():
    text = source_html("MAE paper (arXiv 2111.06377 Table 12); facebookresearch/mae FINETUNE.md (row 'TF/TPU')")
    assert '<a href="https://arxiv.org/abs/2111.06377">arXiv 2111.06377</a>' in text
    assert '<a href="https://github.com/facebookresearch/mae">facebookresearch/mae</a>' in text
    assert "TF/TPU" in text and "github.com/TF" not in text
    assert "href" not in source_html("BEiT v2 paper abstract")


def test_leaderboard_cli_writes_the_site(study, tmp_path):
    result = CliRunner().invoke(app, ["leaderboard", "--html", str(tmp_path / "s"), "--include-runs", str(study)])
    assert result.exit_code == 0, result.output
    assert "leaderboard site written to" in result.output and (tmp_path / "s" / "index.html").is_file()
    index = (tmp_path / "s" / "index.html").read_text()
    assert all(f'href="{t.name}.html"' in index for t in all_tasks())


def test_no_network_reference_is_caught_by_the_check(page_refs):
    # the check itself: a remote script, image or stylesheet is found; a source link is not
    page = ('<html><head><link rel="stylesheet" href="https://cdn.example/x.css"><style>body{background:'
            'url(http://x/y.png)}</style></head><body><img src="https://x/i.png"><a href="https://github.com/a/b">'
            "a/b</a><script src='//cdn.example/s.js'></script></body></html>")
    found = page_refs.of(page).network()
    assert [(t, a) for t, a, _ in found] == [("link", "href"), ("style", "url"), ("img", "src"), ("script", "src")]


def test_site_ranks_robustness_sets_and_lists_low_shot_runs(tmp_path, record_writer):
    """A robustness run is one record per set: an ImageNet-C run sits under the published 'in-c' protocol with its
    mCE, ranked lowest first among MAE Table 13's rows; a Fashion-MNIST-C run and a low-shot run are listed under
    their own protocols, not comparable (the leaderboard has no such rows)."""
    evals = tmp_path / "evals"

    def run(folder, task, value, dataset, protocol, metrics=None, **extra):
        path = record_writer(evals / "mae" / folder, task, value, technique="mae", epochs=1600, arch="vit-h/14",
                             dataset=dataset, metrics=metrics, protocol=protocol)
        rec = json.loads(path.read_text())
        rec["protocol"].update(extra)
        path.write_text(json.dumps(rec))

    run("robustness", "robustness", 70.0, "imagenet-c", "robustness/imagenet", {"mCE": 35.0}, set="in-c")
    run("robustness-fm", "robustness", 60.0, "fashion-mnist-c", "robustness/demo", {"mCE": 80.0}, set="fmnist-c")
    run("lowshot", "lowshot", 55.0, "imagenet", "lowshot/msn", runs=["a.json", "b.json"])  # a low-shot summary
    write_site(tmp_path / "site", include_runs=[evals])
    page = (tmp_path / "site" / "robustness.html").read_text()
    section = re.search(r'data-protocol="in-c">.*?</section>', page, re.S).group(0)
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", section.split("<tbody>")[1], re.S)
    h14 = [r for r in rows if "<td>vit-h/14</td>" in r]
    values = [float(re.findall(r'<td class="num" data-sort="[^"]*">([0-9.]+)</td>', r)[-1]) for r in h14]
    assert values == [33.8, 35.0, 41.3]  # MAE H, the run (its mCE, not its top-1), supervised H: lowest first
    assert "your run" in h14[1] and "not comparable" not in section
    demo = re.search(r'data-protocol="robustness/demo">.*?</section>', page, re.S).group(0)
    assert demo.count('<tr class="own"') == 1 and "not comparable</span>" in demo
    lowshot = (tmp_path / "site" / "lowshot.html").read_text()
    own = re.findall(r'<tr class="own"[^>]*>.*?</tr>', lowshot, re.S)
    assert len(own) == 1 and "not comparable</span>" in own[0] and 'data-protocol="lowshot/msn"' in own[0]
