"""The demo's analysis steps on small MAE and DDAE runs: records with the pre-training measures, reuse, the
DDAE-vs-MAE note and the report's attention-distance figure."""
from __future__ import annotations

import os


from mimbench.analysis.demo import locality_note
from mimbench.demo import QUICK
from mimbench.results.report import write_report
from mimbench.steps import Analyze, StepRunner

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "pretrain", "configs")


def _record(means):
    return {"metrics": {"attention_distance_mean": means}}


def test_locality_note_compares_the_deeper_half_and_gives_the_numbers():
    note = locality_note({"ddae": _record([10.0, 9.0, 4.0, 5.0]), "mae": _record([10.0, 9.0, 8.0, 7.0])})
    assert "ddae's deeper half of blocks is more local than mae's (4.50 vs 7.50 px" in note
    assert "ddae [10.00, 9.00, 4.00, 5.00]" in note and "mae [10.00, 9.00, 8.00, 7.00]" in note
    flipped = locality_note({"ddae": _record([1.0, 9.0]), "mae": _record([1.0, 2.0])})
    assert "is not more local than mae's (9.00 vs 2.00" in flipped
    assert locality_note({"mae": _record([1.0])}) == ""  # nothing to compare


def test_demo_analysis_steps_of_mae_and_ddae_runs(tmp_path):
    from pretrain.main import run_pretrain

    small = ["schedule.epochs=1", "schedule.warmup_epochs=0.5", "data.limit=64", "optim.batch_size=32"]
    encoders = {name: run_pretrain(os.path.join(CONFIGS, f"{name}_micro_fmnist.py"), out=tmp_path / "enc" / name,
                                   overrides=small) for name in ("mae", "ddae")}
    steps = [Analyze(name, QUICK.analysis) for name in encoders]

    def run(lines):
        runner = StepRunner(tmp_path, log=lines.append, header=lambda text: None)
        runner.encoders.update(encoders)  # made before the first step
        return {o.step.encoder: o for o in runner.run(steps)}

    lines: list[str] = []
    outcomes = run(lines)
    assert not any(o.reused for o in outcomes.values()) and not any("reusing" in line for line in lines)
    records = {name: o.record for name, o in outcomes.items()}
    for name, record in records.items():
        assert record["protocol"]["subset"]["size"] == 200 and record["dataset"]["sizes"]["train"] == 2048
        assert record["metrics"]["pretrain"]["loss_by_distance"], name  # both are MAE-family runs
        assert outcomes[name].path == tmp_path / "analysis" / name
    again: list[str] = []
    kept = run(again)
    assert all(o.reused for o in kept.values()) and {k: o.record["run_id"] for k, o in kept.items()} == {
        k: r["run_id"] for k, r in records.items()}
    assert sum("reusing" in line for line in again) == 2
    note = locality_note(records)
    assert note.startswith("Attention distance at demo scale") and "ddae's deeper half" in note
    text = write_report([tmp_path / "analysis"], fmt="md", out=tmp_path / "report.md")
    assert (tmp_path / "report_attention_distance.png").is_file() and "report_attention_distance.png" in text
