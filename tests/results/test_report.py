"""Reports: mean ± std over seeds with exact numbers, every output format, notes, figures."""
from __future__ import annotations

import io
import json
import time
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from mimbench.errors import MimbenchError
from mimbench.results import plots
from mimbench.results.records import new_record, write_record
from mimbench.results.report import pivot, run_table, summarize, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def add(folder, task, value, *, seed=0, technique="mae", epochs=800.0, deviations=(), dataset="imagenet",
        extra_metrics=None, path="enc.safetensors"):
    t = time.time()
    metrics = {"mIoU": value} if task == "segment" else {"top1": value}
    metrics.update(extra_metrics or {})
    rec = new_record(task, protocol={"name": f"{task}/std", "sha256": "cd" * 32, "deviations": list(deviations)},
                     encoder={"path": str(Path(folder) / path), "sha256": "ab" * 32, "arch": "vit-b/16",
                              "technique": technique, "epochs": epochs},
                     dataset={"name": dataset, "sizes": {"train": 10}}, metrics=metrics, seed=seed,
                     started=t, finished=t + 1.0)
    return write_record(folder, rec)


@pytest.fixture
def runs(tmp_path):
    d = tmp_path / "runs"
    for seed, v in enumerate([70.0, 72.0, 74.0]):  # mean 72, sample std 2
        add(d, "linear", v, seed=seed)
    add(d, "finetune", 83.1)
    add(d, "knn", 60.5, seed=0)
    add(d, "knn", 61.5, seed=1)  # mean 61, std 0.70711
    add(d, "linear", 65.0, technique="mae", epochs=100.0)
    add(d, "linear", 66.0, technique="ddae", epochs=100.0)
    add(d, "segment", 40.25, technique="ddae", epochs=100.0, dataset="ade20k",
        extra_metrics={"per_class_iou": {"background": 90.0, "t-shirt": 20.5, "bag": 10.25}})
    add(d, "linear", 30.0, technique="", epochs=0.0, path="random_init.safetensors",
        deviations=["fast linear probe: 5 epochs"], dataset="builtin:fashion-mnist")
    (d / ("linear-" + "0" * 32 + ".json")).write_text('{"schema_version": 1, "run_id":')  # cut short
    t = time.time()
    failed = new_record("linear", protocol={"name": "linear/std", "sha256": "cd" * 32},
                        encoder={"path": "x.safetensors", "sha256": "ab" * 32, "arch": "vit-b/16", "technique": "mae",
                                 "epochs": 800.0},
                        dataset={"name": "imagenet"}, metrics={"top1": None}, seed=9, started=t, finished=t,
                        status="failed")
    (d / "failed.txt").write_text(str(write_record(d, failed)))
    return d


def test_summary_mean_std_over_seeds(runs):
    table, problems = run_table([runs])
    assert len(table) == 10 and len(problems) == 2
    assert any(("linear-" + "0" * 32 + ".json") in p and "not valid JSON" in p for p in problems)
    failed = (runs / "failed.txt").read_text()
    assert any(p == f"{failed}: status failed; left out" for p in problems)
    assert set(table.loc[table["task"] == "segment", "column"]) == {"ADE20K mIoU"}
    s = summarize(table).set_index(["label", "task"])
    lin = s.loc[("mae @ 800 ep", "linear")]
    assert lin["mean"] == 72.0 and lin["std"] == 2.0 and lin["n"] == 3 and not lin["deviates"]
    knn = s.loc[("mae @ 800 ep", "knn")]
    assert knn["mean"] == 61.0 and knn["std"] == pytest.approx(0.5 ** 0.5) and knn["n"] == 2
    assert pd.isna(s.loc[("mae @ 800 ep", "finetune"), "std"])
    assert s.loc[("random_init", "linear"), "deviates"]  # no technique: encoder file stem


def test_markdown_report(runs):
    text = write_report([runs], fmt="md")
    lines = text.splitlines()
    header = lines[0]
    for col in ("technique / checkpoint", "linear top-1", "fine-tune top-1", "k-NN top-1", "ADE20K mIoU"):
        assert col in header
    row = next(line for line in lines if line.startswith("| mae @ 800 ep"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["mae @ 800 ep", "72.00 ± 2.00 (n=3)", "83.10", "61.00 ± 0.71 (n=2)", "–"]
    ddae = [c.strip() for c in next(line for line in lines if line.startswith("| ddae @ 100 ep")).strip("|").split("|")]
    assert ddae == ["ddae @ 100 ep", "66.00", "–", "–", "40.25"]
    # rows ordered by technique then epochs
    order = [line.split("|")[1].strip() for line in lines[2:] if line.startswith("|")]
    assert order == ["ddae @ 100 ep", "mae @ 100 ep", "mae @ 800 ep", "random_init"]
    assert "30.00 †" in text and "(n=1)" not in text
    assert "- † fast linear probe: 5 epochs (linear top-1: random_init)" in lines
    assert any(line.startswith("- † demo scale") and line.endswith("(linear top-1: random_init)") for line in lines)
    assert "How to read this:" in text
    assert any(line.startswith("- skipped:") and ("linear-" + "0" * 32 + ".json") in line for line in lines)


def test_csv_report_parses_to_numbers(runs):
    text = write_report([runs], fmt="csv")
    df = pd.read_csv(io.StringIO(text), comment="#", index_col=0)
    assert df.loc["mae @ 800 ep", "linear top-1 mean"] == 72.0
    assert df.loc["mae @ 800 ep", "linear top-1 std"] == 2.0
    assert df.loc["mae @ 800 ep", "linear top-1 n"] == 3
    assert df.loc["mae @ 800 ep", "k-NN top-1 std"] == pytest.approx(0.7071, abs=1e-4)
    assert df.loc["ddae @ 100 ep", "ADE20K mIoU mean"] == 40.25
    assert pd.isna(df.loc["mae @ 800 ep", "ADE20K mIoU mean"])
    assert bool(df.loc["random_init", "linear top-1 deviates"]) is True
    assert "# skipped:" in text


def test_latex_report(runs):
    text = write_report([runs], fmt="latex")
    assert text.startswith("\\begin{tabular}{lrrrr}") and "\\end{tabular}" in text
    assert "72.00 $\\pm$ 2.00 (n=3)" in text and "\\toprule" in text
    assert "30.00 $^\\dagger$" in text and "\n% How to read this:" in text
    assert "\n% skipped:" in text


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self.items, self._in = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag in ("td", "th", "li"):
            self._in, self._buf = tag, ""

    def handle_data(self, data):
        if self._in:
            self._buf += data

    def handle_endtag(self, tag):
        if tag == self._in:
            (self.items if tag == "li" else self.cells).append(self._buf.strip())
            self._in = None


def test_html_report(runs):
    parser = _Cells()
    parser.feed(write_report([runs], fmt="html"))
    assert "72.00 ± 2.00 (n=3)" in parser.cells and "mae @ 800 ep" in parser.cells
    assert "ADE20K mIoU" in parser.cells
    assert any(i.startswith("skipped:") for i in parser.items)


def test_report_with_out_writes_table_and_figures(runs, tmp_path):
    pre = tmp_path / "pretrain"
    pre.mkdir()
    (pre / "log.jsonl").write_text("\n".join(json.dumps({"it": i, "epoch": 0, "loss": 1.0 / (i + 1)})
                                             for i in range(5)) + '\n{"it": 5, "lo')
    out = tmp_path / "report" / "table.md"
    text = write_report([runs, pre], fmt="md", out=out)
    assert out.read_text().rstrip("\n") == text
    figures = [Path(line.split("figure: ")[1]) for line in text.splitlines() if "figure: " in line]
    names = {f.name for f in figures}
    assert {"table_summary.png", "table_metric_vs_epochs.png", "table_loss_pretrain.png"} <= names
    assert any(n.startswith("table_iou_ddae-100-ep_") for n in names)  # the segment run is ddae @ 100 ep
    for f in figures:
        assert f.parent == out.parent and f.stat().st_size > 1000 and f.read_bytes()[:8] == PNG_MAGIC


def test_loss_log_reader_skips_bad_lines(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"it": 0, "loss": 2.0}\n{"epoch": 1}\nnot json\n{"it": 10, "loss": 1.5, "lr": 0.1}\n')
    assert plots.read_loss_log(log) == ([0, 10], [2.0, 1.5])
    (tmp_path / "empty.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(MimbenchError, match="no lines with 'it' and 'loss'"):
        plots.plot_loss_curve(tmp_path / "empty.jsonl", tmp_path / "x.png")


def test_report_errors(tmp_path, runs):
    with pytest.raises(MimbenchError, match="Unknown report format"):
        write_report([runs], fmt="xlsx")
    with pytest.raises(MimbenchError, match="does not exist"):
        write_report([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    text = write_report([tmp_path / "empty"], fmt="md")
    assert text.startswith("No finished evaluation runs found.") and "no run records" in text


def test_loss_figures_of_several_encoders_do_not_overwrite_each_other(runs, tmp_path):
    evals = tmp_path / "evals"
    for enc in ("mae", "ddae"):
        d = evals / enc / "finetune"
        d.mkdir(parents=True)
        (d / "log.jsonl").write_text("\n".join(json.dumps({"it": i, "loss": 1.0 / (i + 1)}) for i in range(4)))
    text = write_report([runs, evals], fmt="md", out=tmp_path / "r" / "t.md")
    names = {Path(line.split("figure: ")[1]).name for line in text.splitlines() if "figure: " in line}
    assert {"t_loss_mae-finetune.png", "t_loss_ddae-finetune.png"} <= names


def test_segmentation_column_names_its_dataset(tmp_path):
    """The demo's FashionMNIST-Seg mIoU must not be shown as ADE20K mIoU; both datasets get their own column."""
    from mimbench.results.report import segment_column

    assert segment_column("ade20k") == "ADE20K mIoU" and segment_column("fashion-mnist-seg") == "FashionMNIST-Seg mIoU"
    d = tmp_path / "seg"
    add(d, "linear", 70.0)
    add(d, "segment", 12.5, dataset="fashion-mnist-seg")
    add(d, "segment", 47.0, dataset="ade20k")
    df = pivot(summarize(run_table([d])[0]))
    assert list(df.columns) == ["linear top-1", "ADE20K mIoU", "FashionMNIST-Seg mIoU"]
    assert df.loc["mae @ 800 ep", "FashionMNIST-Seg mIoU"] == "12.50 †"  # built-in data: demo scale
    assert df.loc["mae @ 800 ep", "ADE20K mIoU"] == "47.00"


DEMO_DEVS = ["dataset: embedded Fashion-MNIST subset instead of ImageNet-1k", "schedule: 20 epochs instead of 90"]


@pytest.fixture
def demo_like(tmp_path):
    """Three encoders and the random control, k-NN and linear each, every run with the same deviations
    (as the demo's records); the linear probe of one encoder run over two seeds."""
    d = tmp_path / "demo"
    for technique, base in (("mae", 70.0), ("ddae", 72.0), ("robust-mae", 71.0), ("random-init", 60.0)):
        epochs = 0.0 if technique == "random-init" else 2.0
        for task, offset in (("knn", 0.0), ("linear", 3.0)):
            devs = DEMO_DEVS if task == "linear" else DEMO_DEVS[:1]
            add(d, task, base + offset, technique=technique, epochs=epochs, deviations=devs,
                dataset="builtin:fashion-mnist", path=f"{technique}.safetensors")
    add(d, "linear", 76.0, seed=1, technique="ddae", epochs=2.0, deviations=DEMO_DEVS,
        dataset="builtin:fashion-mnist", path="ddae.safetensors")
    return d


def test_grouped_deviations_list_each_distinct_deviation_once(demo_like):
    text = write_report([demo_like], fmt="md")
    bullets = [line for line in text.splitlines() if line.startswith("- †")]
    # 9 records share three distinct deviations (two recorded + demo scale): three lines, not one per record
    assert len(bullets) == 3
    assert f"- † {DEMO_DEVS[0]} (linear top-1, k-NN top-1: all rows)" in bullets
    assert f"- † {DEMO_DEVS[1]} (linear top-1: all rows)" in bullets
    assert "- † demo scale (dataset builtin:fashion-mnist) (linear top-1, k-NN top-1: all rows)" in bullets
    for dev in DEMO_DEVS:
        assert sum(dev in line for line in text.splitlines()) == 1
    ddae = next(line for line in text.splitlines() if line.startswith("| ddae @ 2 ep"))
    assert "75.50 ± 0.71 (n=2) †" in ddae and "72.00 †" in ddae  # n only where two runs make the cell


def test_grouped_deviations_name_the_rows_when_not_all(tmp_path):
    from mimbench.results.report import grouped_deviations

    d = tmp_path / "r"
    add(d, "linear", 70.0, technique="mae", deviations=["fast probe"])
    add(d, "knn", 60.0, technique="mae", deviations=["fast probe"])
    add(d, "linear", 71.0, technique="ddae", deviations=["fast probe"])
    add(d, "knn", 61.0, technique="ddae")
    runs, _ = run_table([d])
    assert grouped_deviations(runs) == [("fast probe", "linear top-1: all rows; k-NN top-1: mae @ 800 ep")]
    assert grouped_deviations(runs, labels=["ddae @ 800 ep", "mae @ 800 ep", "x"]) == [
        ("fast probe", "linear top-1: ddae @ 800 ep, mae @ 800 ep; k-NN top-1: mae @ 800 ep")]


def test_summary_figure_marks_the_control_and_epoch_figure_needs_two_epoch_values(demo_like, tmp_path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    drawn = []
    real = plots._save

    def keep(fig, out):
        drawn.append((Path(out).name, fig))
        axes = fig.get_axes()
        drawn.append(([ax.get_ylabel() for ax in axes],
                      [[p.get_hatch() for p in ax.patches] for ax in axes],
                      [[ln.get_linestyle() for ln in ax.get_lines()] for ax in axes]))
        return real(fig, out)

    out = tmp_path / "rep" / "report.md"
    import unittest.mock

    with unittest.mock.patch.object(plots, "_save", keep):
        text = write_report([demo_like], fmt="md", out=out)
    names = {Path(line.split("figure: ")[1]).name for line in text.splitlines() if "figure: " in line}
    assert "report_summary.png" in names
    assert "report_metric_vs_epochs.png" not in names  # every pre-trained encoder at 2 epochs: no line to draw
    summary = out.parent / "report_summary.png"
    assert summary.read_bytes()[:8] == PNG_MAGIC and summary.stat().st_size > 5000
    ylabels, hatches, styles = drawn[1]
    assert ylabels == ["linear top-1", "k-NN top-1"]
    for panel in hatches:  # four bars, the control (last) hatched
        assert [bool(h) for h in panel] == [False, False, False, True] and panel[-1] == "//"
    assert all("--" in panel for panel in styles)  # the control's level drawn across each panel
    plt.close("all")
    # with a second epoch value for one technique, the epochs figure appears
    add(demo_like, "knn", 75.0, technique="mae", epochs=10.0, dataset="builtin:fashion-mnist")
    text = write_report([demo_like], fmt="md", out=out)
    assert "report_metric_vs_epochs.png" in text


def test_lowshot_summary_is_one_cell_of_its_runs_mean_and_std(tmp_path):
    d = tmp_path / "runs"
    top1 = [30.0, 33.0, 39.0]  # mean 34, sample std 4.5826
    t = time.time()
    runs = [{"shots": 10, "seed": s, "top1": v, "top5": 90.0} for s, v in enumerate(top1)]
    summary = new_record("lowshot", protocol={"name": "lowshot/msn_logreg_in1k", "sha256": "cd" * 32, "runs": runs},
                         encoder={"path": "enc.safetensors", "sha256": "ab" * 32, "arch": "vit-b/16",
                                  "technique": "mae", "epochs": 800.0},
                         dataset={"name": "imagenet"}, metrics={"top1": 34.0, "top1_std": 4.5826, "runs": 3},
                         seed=0, started=t, finished=t + 1.0)
    write_record(d, summary)
    for run in runs:  # the runs' own records, as lowshot writes them under <out>/runs/: not counted twice
        rec = new_record("lowshot", protocol={"name": "lowshot/msn_logreg_in1k", "sha256": "cd" * 32, "subset": run},
                         encoder=summary["encoder"], dataset={"name": "imagenet"}, metrics={"top1": run["top1"]},
                         seed=run["seed"], started=t, finished=t + 1.0)
        write_record(d / "runs", rec)
    add(d, "knn", 50.0)
    table, problems = run_table([d])
    assert problems == []
    lowshot = table[table["task"] == "lowshot"]
    assert set(lowshot["column"]) == {"10-shot top-1"} and sorted(lowshot["value"]) == top1
    cell = pivot(summarize(table)).loc["mae @ 800 ep", "10-shot top-1"]
    assert cell == "34.00 ± 4.58 (n=3)"
    assert list(pivot(summarize(table)).columns) == ["k-NN top-1", "10-shot top-1"]
