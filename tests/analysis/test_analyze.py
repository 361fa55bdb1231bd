"""`mimbench analyze` end to end on tiny encoders and a part of the built-in data: record, figures, compare across
depths, an unreadable attention skipped with its reason, and an MAE pre-training run's measures."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mimbench.analysis import attention as attention_module
from mimbench.analysis import run_analyze
from mimbench.analysis.pretraining import loss_by_distance, nearest_visible_distance
from mimbench.analysis.run import subset_indices
from mimbench.cli import app
from mimbench.errors import MimbenchError
from mimbench.results.records import load_records
from mimbench.testing import write_tiny_encoder

SMALL = dict(samples=24, limit_train=120, limit_val=40)
FIGURES = {"attention_distance.png", "attention_entropy.png", "probes_by_layer.png", "rankme.png", "cka_self.png"}


def test_the_subset_is_seeded_sorted_and_without_repeats():
    a = subset_indices(2000, 100, seed=3)
    assert np.array_equal(a, subset_indices(2000, 100, seed=3)) and not np.array_equal(a, subset_indices(2000, 100, 4))
    assert len(set(a.tolist())) == 100 and np.all(np.diff(a) > 0)
    assert np.array_equal(subset_indices(50, 100, seed=0), np.arange(50))


def test_cli_writes_the_record_and_figures_and_compares_encoders_of_different_depths(tmp_path, tiny_encoder):
    deeper = write_tiny_encoder(tmp_path / "deeper.safetensors", depth=3, seed=5)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["analyze", str(tiny_encoder), "--data", "builtin:fashion-mnist", "--out",
                                      str(out), "--compare", str(deeper), "--samples", "24", "--seed", "7",
                                      "--limit-train", "120", "--limit-val", "40"])
    assert result.exit_code == 0, result.output
    (path,) = out.glob("analyze-*.json")
    record = json.loads(path.read_text())
    m = record["metrics"]
    assert record["task"] == "analyze" and record["status"] == "ok"
    assert record["protocol"]["subset"]["seed"] == 7 and record["protocol"]["subset"]["size"] == 24
    assert record["dataset"]["sizes"] == {"subset": 24, "train": 120, "val": 40}
    assert np.array(m["attention_distance"]).shape == (2, 2) and np.array(m["attention_entropy"]).shape == (2, 2)
    assert len(m["rankme"]) == 2 and all(1 <= r <= 32 for r in m["rankme"])
    assert set(m["knn_top1_per_block"]) == set(m["linear_top1_per_block"]) == {"0", "1"}
    assert np.allclose(np.diag(m["cka_self"]), 1.0)
    assert np.array(m["cka_compare"]).shape == (2, 3) and m["compare_depths"] == [2, 3]
    assert record["protocol"]["compare"]["sha256"] and record["protocol"]["skipped"] == {}
    assert FIGURES | {"cka_compare.png"} <= {p.name for p in out.iterdir()}
    table, problems = load_records(out)
    assert list(table["task"]) == ["analyze"] and not problems


def test_an_unreadable_attention_skips_only_the_attention_measures(tmp_path, tiny_encoder, monkeypatch):
    monkeypatch.setattr(attention_module, "READERS", {})
    record = run_analyze(tiny_encoder, data="builtin:fashion-mnist", out=tmp_path, **SMALL)
    skipped = record["protocol"]["skipped"]
    assert set(skipped) == {"attention_distance", "attention_entropy"} and "cannot be read" in skipped["attention_distance"]
    assert "attention_distance" not in record["metrics"] and len(record["metrics"]["rankme"]) == 2
    assert not (tmp_path / "attention_distance.png").exists() and (tmp_path / "cka_self.png").is_file()


def test_nearest_visible_distance_on_a_hand_built_mask():
    # 3x3 grid, only the centre visible: the 4-neighbours are 1 away, the corners sqrt 2
    mask = torch.ones(1, 9)
    mask[0, 4] = 0
    d = nearest_visible_distance(mask, 3)
    assert d[0].tolist() == pytest.approx([2 ** 0.5, 1, 2 ** 0.5, 1, 0, 1, 2 ** 0.5, 1, 2 ** 0.5])
    loss = torch.arange(9, dtype=torch.float32)[None]
    bins = loss_by_distance(loss, mask, 3)  # sqrt 2 rounds to bin 1: every masked patch there
    assert bins == {"1": {"loss": pytest.approx(4.0), "patches": 8}}


def test_a_mae_pretraining_run_gives_loss_by_distance_and_target_statistics(tmp_path):
    from pretrain.main import run_pretrain

    configs = os.path.join(os.path.dirname(__file__), "..", "..", "pretrain", "configs")
    run = tmp_path / "mae"
    enc = run_pretrain(os.path.join(configs, "mae_micro_fmnist.py"), out=run,
                       overrides=["schedule.epochs=1", "schedule.warmup_epochs=0.5", "data.limit=64",
                                  "optim.batch_size=32"])
    record = run_analyze(enc, data="builtin:fashion-mnist", out=tmp_path / "an", pretrain_run=run, **SMALL)
    pre = record["metrics"]["pretrain"]
    masked = 24 * (64 - int(64 * (1 - pre["mask_ratio"])))  # 8x8 patches, MAE's truncation of the kept count
    assert sum(b["patches"] for b in pre["loss_by_distance"].values()) == masked
    assert all(b["loss"] > 0 for b in pre["loss_by_distance"].values())
    tn = pre["target_norm"]
    assert 0 < tn["mean_patch_variance"] < tn["population_variance"] and 0 < tn["within_patch_share"] < 1
    assert tn["per_patch_gain_p95"] >= tn["per_patch_gain_median"] > 0
    assert (tmp_path / "an" / "loss_by_distance.png").is_file()
    with pytest.raises(MimbenchError, match="not a pre-training folder"):  # refused before any work
        run_analyze(enc, data="builtin:fashion-mnist", out=tmp_path / "bad", pretrain_run=tmp_path / "an", **SMALL)
    assert not (tmp_path / "bad").exists()
