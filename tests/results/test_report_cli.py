"""`mimbench report | leaderboard | compare` from the command line: output and exit codes."""
from __future__ import annotations

import io
import time

import pandas as pd
from typer.testing import CliRunner

from mimbench.cli import app
from mimbench.results.records import new_record, write_record

runner = CliRunner()


def _record(folder, task="linear", value=70.0, seed=0, deviations=(), dataset="imagenet"):
    t = time.time()
    rec = new_record(task, protocol={"name": f"{task}/std", "sha256": "cd" * 32, "deviations": list(deviations)},
                     encoder={"path": "enc.safetensors", "sha256": "ab" * 32, "arch": "vit-b/16", "technique": "mae",
                              "epochs": 1600.0},
                     dataset={"name": dataset}, metrics={"top1": value}, seed=seed, started=t, finished=t + 1)
    return write_record(folder, rec)


def test_cli_report_csv_and_out(tmp_path):
    runs = tmp_path / "runs"
    _record(runs, value=70.0, seed=0)
    _record(runs, value=71.0, seed=1)
    result = runner.invoke(app, ["report", str(runs), "--format", "csv"])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(io.StringIO(result.output), comment="#", index_col=0)
    assert df.loc["mae @ 1600 ep", "linear top-1 mean"] == 70.5 and df.loc["mae @ 1600 ep", "linear top-1 n"] == 2
    out = tmp_path / "rep" / "table.md"
    result = runner.invoke(app, ["report", str(runs), "--out", str(out)])
    assert result.exit_code == 0 and out.is_file() and (out.parent / "table_summary.png").is_file()
    assert not (out.parent / "table_metric_vs_epochs.png").exists()  # one epoch value: no line to draw


def test_cli_report_bad_format_exits_2(tmp_path):
    _record(tmp_path / "runs")
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--format", "xlsx"])
    assert result.exit_code == 2 and "is not one of" in result.output and "latex" in result.output


def test_cli_leaderboard_and_compare(tmp_path):
    good = _record(tmp_path / "runs", value=67.5)
    result = runner.invoke(app, ["leaderboard", "--task", "linear", "--arch", "vit-b/16",
                                 "--include-runs", str(tmp_path / "runs")], terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "mae (own)" in result.output and "BEiT v2" in result.output
    result = runner.invoke(app, ["compare", str(good)], terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "ranks" in result.output
    assert "above: MAE (official re-run) 1600 ep 67.80 (delta -0.30" in result.output
    assert "below: MAE (mmpretrain) 1600 ep 67.10 (delta +0.40" in result.output
    demo = _record(tmp_path / "demo", value=90.0, dataset="builtin:fashion-mnist")
    result = runner.invoke(app, ["compare", str(demo)])
    assert result.exit_code == 2 and "cannot be ranked" in result.output


def test_cli_report_piped_prints_plain_markdown(tmp_path):
    runs = tmp_path / "runs"
    _record(runs, value=70.0, seed=0, deviations=["fast probe"])
    _record(runs, value=71.0, seed=1, deviations=["fast probe"])
    result = runner.invoke(app, ["report", str(runs)], terminal_width=60)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("| technique / checkpoint") and "\x1b[" not in result.output
    assert "| 70.50 ± 0.71 (n=2) † |" in lines[2]  # one line per row, whatever the width
    assert sum("fast probe" in line for line in lines) == 1 and "How to read this:" in result.output


def test_console_table_fits_a_narrow_terminal(tmp_path):
    from rich.console import Console

    from mimbench.results.report import console_table

    runs = tmp_path / "runs"
    for task in ("linear", "knn", "finetune"):
        _record(runs, task=task, value=70.0)
    console = Console(width=60, force_terminal=True, record=True)
    console_table([runs], console)
    text = console.export_text()
    assert all(len(line) <= 60 for line in text.splitlines())
    assert "linear top-1" in " ".join(text.split()) and "70.00" in text
