"""`mimbench reproduce mae-fig9`: the partial fine-tuning sweep of MAE Figure 9 (points, selection, job files, demo run)."""
from __future__ import annotations

import json
import shlex
import subprocess

from mimbench import partial_ft as P
from mimbench import reproduce as R
from mimbench.config import load_config, parse_override
from mimbench.demo import QUICK


def test_sweep_points_follow_the_figure_up_to_the_depth():
    assert P.sweep_blocks(24) == [0, "mlp", 1, 2, 4, 6, 12, 18, "all"]
    assert P.sweep_blocks(4) == [0, "mlp", 1, 2, "all"]
    assert P.sweep_blocks(3) == [0, "mlp", 1, 2, "all"]
    points = P.sweep_points(24, P.PAPER_EPOCHS)
    assert len(points) == 9 * 3 and P.PAPER_EPOCHS == (50, 100, 200)
    assert [p.label for p in points[::3]] == ["0", "MLP", "1", "2", "4", "6", "12", "18", "24"]
    mlp = dict(parse_override(o) for o in points[4].overrides)
    assert points[4].name == "kmlp_e100" and mlp == {"finetune.trainable_blocks": "mlp", "schedule.epochs": 100}
    last = points[-1]
    assert last.name == "k24_e200" and dict(parse_override(o) for o in last.overrides)["finetune.trainable_blocks"] == "all"
    demo = P.sweep_points(4, (1, 2), 0.5)
    assert dict(parse_override(o) for o in demo[0].overrides) == {
        "finetune.trainable_blocks": 0, "schedule.epochs": 1, "schedule.warmup_epochs": 0.5}
    for point in demo:  # every override is a valid fine-tune config value
        load_config("eval_configs/demo/finetune_fmnist.py", point.overrides, kind="finetune")
    for scale in P.SWEEP_SCALES.values():  # each scale's budgets are valid pre-training and fine-tune values
        load_config(f"pretrain/configs/{scale.pretrain_config}", scale.pretrain, kind="pretrain")
        load_config(f"eval_configs/{scale.finetune_config}", scale.evaluate, kind="finetune")


def _record(blocks, epochs, top1, trained=100):
    return {"task": "finetune", "status": "ok", "metrics": {"top1": top1},
            "protocol": {"trainable_blocks": blocks, "epochs": epochs, "trained_params": trained}}


def test_each_point_keeps_its_best_length_and_records_the_others():
    records = [_record("all", 1, 70.0), _record(1, 1, 60.0), _record(1, 2, 64.5), _record(1, 4, 63.0),
               _record("mlp", 1, 55.0), _record("mlp", 2, 55.0), _record(0, 4, 50.0)]
    rows = P.best_per_point(records)
    assert [r["trainable_blocks"] for r in rows] == [0, "mlp", 1, "all"]  # x order, whatever the record order
    one = rows[2]
    assert (one["top1"], one["best_epochs"], one["by_epochs"]) == (64.5, 2, {1: 60.0, 2: 64.5, 4: 63.0})
    assert rows[1]["best_epochs"] == 1  # a tie goes to the shorter fine-tune
    table = P.tabulate(rows, 4, {"0": 73.5, "MLP": 79.1, "1": 81.0})
    line = next(ln for ln in table.splitlines() if ln.startswith("| 1 |"))
    assert "64.50 (2)" in line and "| 81 |" in line and "60.00" in line
    assert next(ln for ln in table.splitlines() if ln.startswith("| 4 |")).split("|")[2].strip() == "all"


def test_paper_points_come_from_the_leaderboard():
    points, lines = P.paper_points()
    assert points == {"0": 73.5, "MLP": 79.1, "1": 81.0}
    assert lines == {"MoCo v3 ViT-L linear (paper)": 77.6}


def test_full_scale_writes_the_vit_l_sweep_as_job_files(tmp_path, capsys):
    root = R.run_reproduce("mae-fig9", scale="full", out=tmp_path / "out")
    assert root == tmp_path / "out" / "mae-fig9"
    commands = (root / "commands.sh").read_text()
    lines = [ln for ln in commands.splitlines() if ln.startswith("torchrun")]
    pretrain = [ln for ln in lines if " pretrain " in ln]
    finetunes = [ln for ln in lines if " eval finetune " in ln]
    assert len(pretrain) == 1 and len(finetunes) == 27
    words = shlex.split(pretrain[0])
    assert words[words.index("--config") + 1] == "pretrain/configs/mae_vit-l_in1k_1600ep.py"
    assert "schedule.epochs=800" in words
    assert load_config(root / "configs" / "mae.py").model.name == "mae_vit_large_patch16"
    for point, line in zip(P.sweep_points(24, P.PAPER_EPOCHS), finetunes):
        words = shlex.split(line)
        assert words[words.index("--config") + 1] == "eval_configs/finetune/mae_vit-l_in1k.py"
        assert words[words.index("--out") + 1] == f"$RUNS/points/{point.name}"
        assert [words[i + 1] for i, w in enumerate(words) if w == "--set"] == list(point.overrides)
        cfg = load_config(root / "configs" / f"{point.name}.py", kind="finetune")
        assert cfg.finetune.trainable_blocks == point.trainable_blocks
        assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.optim.layer_decay) == (point.epochs, 5, 0.75)
        assert line.split(" ", 2)[2] in (root / "sbatch" / f"{point.name}.sbatch").read_text()
    assert commands.rstrip().endswith('python -m mimbench.partial_ft "$RUNS"')
    everything = commands + "".join(p.read_text() for p in (root / "sbatch").iterdir())
    assert str(tmp_path) not in everything and "/work/" not in everything
    for script in [root / "commands.sh", *(root / "sbatch").iterdir()]:
        subprocess.run(["bash", "-n", str(script)], check=True)
    assert "nothing was run" in capsys.readouterr().out


def test_demo_sweep_runs_at_tiny_size_side_by_side_and_writes_the_figure_and_records(tmp_path):
    tiny = P.SweepScale("quick", "mae_micro_fmnist.py", QUICK.pretrain + ("data.limit=64", "optim.batch_size=16"),
                        "demo/finetune_fmnist.py", (1, 2), 0.5,
                        ("data.limit_train=32", "data.limit_val=16", "optim.batch_size=16"))
    grid = R.build_grid("mae-fig9", "demo", quick=True)
    logged = []
    table = P.run_demo_sweep(grid, tiny, tmp_path, log=logged.append, jobs=2)  # the points side by side
    root = tmp_path / "mae-fig9"
    steps = (root / "steps.csv").read_text().splitlines()
    assert len(steps) == 1 + 11 and all(",ran," in line for line in steps[1:])  # pre-training + 10 fine-tunes
    assert table == root / "table.md"
    assert (root / "fig9.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((root / "results.json").read_text())
    assert [r["trainable_blocks"] for r in rows] == [0, "mlp", 1, 2, "all"]  # the micro encoder's depth 4
    trained = [r["trained_params"] for r in rows]
    assert trained == sorted(trained) and len(set(trained)) == 5  # each point trains more than the one before
    for row in rows:
        assert set(row["by_epochs"]) == {"1", "2"} and row["top1"] == max(row["by_epochs"].values())
        for epochs in (1, 2):
            name = f"k{P.tick(row['trainable_blocks'], 4).lower()}_e{epochs}"
            record = next((root / "points" / name / "evals" / "mae" / "finetune").glob("finetune-*.json"))
            proto = json.loads(record.read_text())["protocol"]
            assert (proto["trainable_blocks"], proto["epochs"]) == (row["trainable_blocks"], epochs)
    text = table.read_text()
    assert "| MLP | mlp |" in text and "| 4 | all |" in text and "not comparable" in text
    # a second run, one step at a time, reuses every step; collecting the records gives the same results
    logged.clear()
    P.run_demo_sweep(grid, tiny, tmp_path, log=logged.append)
    assert "11 of 11 steps" in table.read_text()
    assert sum(line.startswith("reusing") for line in logged) == 11
    before = (root / "results.json").read_text()
    assert P.collect(root, scale="quick") == table and (root / "results.json").read_text() == before
    assert "quick scale" in table.read_text()
