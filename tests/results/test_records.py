"""Run records: fields, atomic writing, and a loader that never silently counts a bad file."""
from __future__ import annotations

import json
import os
import re
import time

import pytest

from mimbench import atomic

from mimbench.errors import MimbenchError
from mimbench.results import records
from mimbench.results.records import (SCHEMA_VERSION, load_records, new_record, record_problems, validate_record,
                                      write_record)

ENCODER = {"path": "runs/mae/encoder.safetensors", "sha256": "ab" * 32, "arch": "vit-d128x6/4", "technique": "mae",
           "epochs": 20.0}


def make(task="linear", top1=71.5, seed=0, started=None, **kw):
    t = time.time() if started is None else started
    args = dict(protocol={"name": "linear/demo", "sha256": "cd" * 32, "deviations": ["epochs 90 -> 5"]},
                encoder=ENCODER, dataset={"name": "builtin:fashion-mnist", "sizes": {"train": 1000, "val": 200}},
                metrics={"top1": top1, "top5": 99.0}, seed=seed, started=t, finished=t + 12.5)
    args.update(kw)
    return new_record(task, **args)


def test_new_record_fields():
    r = make()
    assert r["schema_version"] == SCHEMA_VERSION == 1
    assert re.fullmatch(r"[0-9a-f]{32}", r["run_id"]) and r["run_id"] != make()["run_id"]
    assert r["task"] == "linear" and r["status"] == "ok" and r["seed"] == 0
    assert r["protocol"] == {"name": "linear/demo", "sha256": "cd" * 32, "deviations": ["epochs 90 -> 5"]}
    assert r["dataset"] == {"name": "builtin:fashion-mnist", "root": None, "sizes": {"train": 1000, "val": 200}}
    assert r["started"].endswith("Z") and r["duration_s"] == 12.5
    assert set(r["versions"]) >= {"python", "torch", "timm", "mmseg", "mimbench", "git_commit"}
    assert r["versions"]["torch"] and r["versions"]["timm"]
    assert r["hardware"]["device"] in ("cpu", "cuda") and r["hardware"]["count"] >= 1
    assert record_problems(r) == []
    bench = make(task="bench", encoder=None, dataset={"name": "synthetic"}, metrics={"img_per_s": 105.0})
    assert bench["encoder"] is None


def test_invalid_records_refused():
    with pytest.raises(MimbenchError, match="task 'probe'"):
        make(task="probe")
    with pytest.raises(MimbenchError, match="'encoder.sha256'"):
        make(encoder={k: v for k, v in ENCODER.items() if k != "sha256"})
    with pytest.raises(MimbenchError, match=r"record.metrics.top1 is nan"):
        make(top1=float("nan"))
    with pytest.raises(MimbenchError, match="seed"):
        make(seed="0")
    r = make()
    r["status"] = "great"
    with pytest.raises(MimbenchError, match="status 'great'"):
        validate_record(r)


def test_write_is_atomic_and_round_trips(tmp_path):
    r = make()
    path = write_record(tmp_path / "out" / "sub", r)
    assert path.name == f"linear-{r['run_id']}.json"
    assert json.loads(path.read_text()) == r
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_unwritable_destination(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(MimbenchError, match="Cannot write the run record"):
        write_record(blocker, make())
    with pytest.raises(MimbenchError, match="Cannot write the run record"):
        write_record(blocker / "below", make())
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(MimbenchError, match="Cannot write the run record"):
            write_record(ro, make())
    finally:
        ro.chmod(0o700)


def test_failed_write_leaves_existing_record_untouched(tmp_path, monkeypatch):
    r = make()
    path = write_record(tmp_path, r)
    before = path.read_bytes()
    r2 = dict(r, metrics={"top1": 1.0})

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)  # the shared atomic writer
    with pytest.raises(MimbenchError, match="No space left"):
        write_record(tmp_path, r2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_loader_flattens_and_skips_bad_files_by_name(tmp_path):
    t0 = time.time()
    good = [write_record(tmp_path / "a", make(seed=s, top1=70.0 + s, started=t0 + s)) for s in range(2)]
    knn = write_record(tmp_path / "b" / "deep", make(task="knn", metrics={"top1": 60.0}, started=t0 + 5))
    corrupt = tmp_path / "a" / f"linear-{'1' * 32}.json"
    corrupt.write_text('{"schema_version": 1, "run_id": ')  # a writer killed halfway (without the atomic writer)
    partial = make()
    del partial["metrics"]
    partial_path = tmp_path / "a" / f"linear-{partial['run_id']}.json"
    partial_path.write_text(json.dumps(partial))
    newer = dict(make(), schema_version=2)
    newer_path = tmp_path / "a" / f"linear-{newer['run_id']}.json"
    newer_path.write_text(json.dumps(newer))
    older = dict(make(), schema_version=0)
    older_path = tmp_path / "a" / f"linear-{older['run_id']}.json"
    older_path.write_text(json.dumps(older))
    dup_path = tmp_path / "b" / f"linear-{'2' * 32}.json"  # a copy of a record under another name
    dup_path.write_text(good[0].read_text())
    (tmp_path / "a" / "scalars.json").write_text("not a record, ignored by name")

    table, problems = load_records(tmp_path / "a", tmp_path / "b", good[0])
    assert len(table) == 3
    assert sorted(table["metrics.top1"]) == [60.0, 70.0, 71.0]
    assert set(table["encoder.technique"]) == {"mae"}
    assert table["dataset.sizes.train"].tolist() == [1000, 1000, 1000]
    assert table["file"].tolist() == [str(good[0]), str(good[1]), str(knn)]  # ordered by start time
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert f"{corrupt}: not valid JSON" in text
    assert f"{partial_path}: missing field 'metrics'" in text
    assert f"{newer_path}: schema_version 2 was written by a newer mimbench" in text
    assert f"{older_path}: schema_version 0 has no migration" in text
    assert f"{dup_path}: duplicate of run" in text
    assert "scalars.json" not in text


def test_loader_empty_and_missing_dirs(tmp_path):
    table, problems = load_records(tmp_path)
    assert len(table) == 0 and "metrics.top1" not in table.columns and "encoder.technique" in table.columns
    assert problems == [f"{tmp_path}: no run records (<task>-<run_id>.json) found"]
    with pytest.raises(MimbenchError, match="does not exist"):
        load_records(tmp_path / "typo")


def test_explicit_file_with_any_name_is_read(tmp_path):
    r = make()
    p = tmp_path / "record.json"
    p.write_text(json.dumps(r))
    table, problems = load_records(p)
    assert problems == [] and table["run_id"].tolist() == [r["run_id"]]


def test_encoder_summary_from_file(tmp_path):
    from functools import partial

    import torch
    from timm.models.vision_transformer import VisionTransformer

    from mimbench.encoders import encoder_sha256, save_encoder
    from mimbench.results.records import encoder_summary

    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    path = save_encoder(vit.state_dict(), tmp_path / "e.safetensors", arch="vit-d32x2/4", technique="ddae", epochs=7,
                        img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    block = encoder_summary(path)
    assert block == {"path": str(path), "sha256": encoder_sha256(path), "arch": "vit-d32x2/4", "technique": "ddae",
                     "epochs": 7.0, "source": "mimbench", "family": "vit", "layout": "mimbench", "dropped": ""}
    assert make(encoder=block)["encoder"]["technique"] == "ddae"


def test_finished_record_is_reused_only_for_the_same_config_overrides_and_encoder(tmp_path):
    import torch

    from mimbench.config import config_sha256, load_config
    from mimbench.encoders import encoder_sha256, save_encoder
    from mimbench.encoders.vit import expected_shapes

    cfg = tmp_path / "probe.py"
    cfg.write_text("schedule = dict(epochs=5)\n")
    arch = dict(img_size=32, patch_size=4, embed_dim=8, depth=1, mlp_ratio=4.0)
    sd = {k: torch.zeros(s) for k, s in expected_shapes(**arch).items()}
    arch["num_heads"] = 1
    # two encoder files that differ only in their metadata, hence in their bytes
    enc = save_encoder(sd, tmp_path / "a.safetensors", arch="t", technique="mae", config_sha256="x", **arch)
    other = save_encoder(sd, tmp_path / "b.safetensors", arch="t", technique="mae", config_sha256="y", **arch)
    step = tmp_path / "step"
    sha = config_sha256(load_config(cfg, ["schedule.epochs=2"]))
    rec = make(protocol={"name": "probe", "sha256": sha, "deviations": []},
               encoder={**ENCODER, "sha256": encoder_sha256(enc)})
    write_record(step, rec)
    assert records.finished_record(step)["run_id"] == rec["run_id"]
    assert records.finished_record(step, cfg, ["schedule.epochs=2"], enc)["run_id"] == rec["run_id"]
    assert records.finished_record(step, cfg, [], enc) is None  # other overrides
    assert records.finished_record(step, cfg, ["schedule.epochs=2"], other) is None  # other encoder
    assert records.finished_record(tmp_path / "missing") is None
    assert not records.encoder_made_by(tmp_path / "missing.safetensors", cfg, [])
    made = save_encoder(sd, tmp_path / "c.safetensors", arch="t", technique="mae",
                        config_sha256=config_sha256(load_config(cfg, [])), **arch)
    assert records.encoder_made_by(made, cfg, []) and not records.encoder_made_by(made, cfg, ["schedule.epochs=2"])
