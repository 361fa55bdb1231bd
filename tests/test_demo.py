"""`mimbench demo --quick`: the whole pipeline end to end on the embedded data, then a rerun that reuses every step."""
import json

import pytest
from typer.testing import CliRunner

from mimbench.cli import app


@pytest.mark.slow
def test_demo_quick_runs_end_to_end_and_reuses_finished_steps(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    encoders = {p.parent.name for p in (out / "encoders").glob("*/encoder.safetensors")}
    assert encoders == {"mae", "ddae", "random-init"}
    records = [json.loads(p.read_text()) for p in (out / "evals").rglob("*-*.json")]
    tasks = sorted((r["task"], r["encoder"]["technique"]) for r in records if "run_id" in r)
    assert {t for t, _ in tasks} == {"knn", "linear", "attentive", "finetune", "segment", "lowshot", "robustness"}
    # 3 encoders x 7 evaluations, plus the low-shot runs' own records (3 seeds each, in lowshot/runs/)
    assert len(tasks) == 3 * 7 + 3 * 3 and all(r["status"] == "ok" for r in records if "run_id" in r)
    report = (out / "report.md").read_text()
    for name in ("mae", "ddae", "random-init"):
        assert name in report
    # the low-shot column: 10 images per class, mean ± std over its 3 seeds
    assert "10-shot top-1" in report and report.count("(n=3)") >= 3
    # the robustness column: Fashion-MNIST-C mCE against the control's fine-tune (the control itself: 100)
    assert "FMNIST-C mCE (lower is better)" in report
    control = next(r for r in records if r.get("task") == "robustness" and r["encoder"]["technique"] == "random-init")
    assert control["metrics"]["mCE"] == pytest.approx(100.0)
    assert "report:" in result.output and "This run of the demo took" in report and "How to read this:" in report
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>") and "report.html" in result.output
    assert (out / "report_summary.png").is_file() and not (out / "report_metric_vs_epochs.png").exists()
    # how long each step took: the table at the end and steps.csv beside the report (2 pre-trainings + the control
    # + 2 data builds + 3 x 7 evaluations + 3 analyses)
    assert "time per step" in result.output and "(each step's time: steps.csv)" in report
    assert len((out / "steps.csv").read_text().splitlines()) == 1 + 2 + 1 + 2 + 3 * 7 + 3
    assert {"build segment data", "build robustness data", "analyze mae", "analyze random-init"} <= _titles(
        out / "steps.csv")
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ")][1:]
    assert rows[-1] == "random-init"  # the control is the last row
    # one config per task for every encoder, the control included (nothing tuned per technique)
    for task in ("finetune", "segment"):
        assert len({r["protocol"]["sha256"] for r in records if r.get("task") == task}) == 1
    devs = [line for line in report.splitlines() if line.startswith("- †")]
    # each distinct deviation once; every encoder runs the same configs, so each applies to all rows of its columns
    assert devs and len(devs) == len(set(devs)) and all(d.endswith("all rows)") for d in devs)

    # second run: nothing is recomputed (2 pre-trainings + the control + 3 encoders x 7 evaluations + 3 analyses
    # decided in the runner; the 2 data builds find their sets and write nothing)
    n_records = len(list((out / "evals").rglob("*-*.json")))
    again = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)], terminal_width=200)
    assert again.exit_code == 0, again.output
    assert again.output.count("reusing") == 2 + 1 + 3 * 7 + 3
    assert len(list((out / "evals").rglob("*-*.json"))) == n_records
    assert "29 of 29 steps" in (out / "report.md").read_text()  # the report says what was reused

    # a step made with other settings (here: a linear-probe record whose resolved config differs, as one
    # left by --quick in a full demo's folder, or by an older config) is redone, and its record replaced
    linear = next((out / "evals" / "mae" / "linear").glob("linear-*.json"))
    stale = json.loads(linear.read_text())
    stale["protocol"]["sha256"] = "0" * 64
    linear.write_text(json.dumps(stale))
    third = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)], terminal_width=200)
    assert third.exit_code == 0, third.output
    assert third.output.count("redoing") == 1 and third.output.count("reusing") == 2 + 1 + 3 * 7 - 1 + 3
    assert not linear.exists() and len(list((out / "evals").rglob("*-*.json"))) == n_records


def _titles(steps_csv):
    return {line.split(",")[0] for line in steps_csv.read_text().splitlines()[1:]}


def test_demo_leaves_out_a_task_whose_extra_is_not_installed(tmp_path, monkeypatch):
    """`pip install mimbench` without the lowshot extra: the demo runs without the low-shot step."""
    import importlib.util

    from mimbench.demo import QUICK, demo_steps

    real = importlib.util.find_spec
    data = {name: "builtin:fashion-mnist" for name in ("knn", "linear", "attentive", "finetune", "lowshot", "robustness")}
    data["segment"] = "builtin:fashion-mnist-seg"
    names = lambda: [getattr(s, "task", None) for s in demo_steps(tmp_path, QUICK, data)]  # noqa: E731
    assert "lowshot" in names()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cyanure" else real(name, *a))
    assert "lowshot" not in names() and "knn" in names()
