"""Trackers (``--tracker``, ``runtime.trackers``): what TensorBoard, W&B (offline) and MLflow (file store) wrote,
read back with each package's own reader and compared with the run's jsonl log and record. No network: W&B runs
offline, MLflow writes a local file store."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

import pytest
from typer.testing import CliRunner

from mimbench import trackers
from mimbench.cli import app
from mimbench.config import load_config
from mimbench.errors import MimbenchError
from mimbench.evals import run_eval

# The extra mimbench[trackers] is part of the test install (README, .ci/run): a missing package fails here.
import mlflow  # noqa: E402,F401
import tensorboard  # noqa: E402,F401
import wandb  # noqa: E402,F401

OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
LINEAR = ["--set", "data.limit_train=128", "--set", "data.limit_val=32", "--set", "optim.batch_size=32",
          "--set", "schedule.epochs=2", "--set", "schedule.warmup_epochs=1", "--set", "runtime.log_every=1"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    # MLflow 3's file store opt-in: mimbench.trackers sets it where it uses the file store
    for key in ("MLFLOW_TRACKING_URI", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def linear_run(tiny_encoder, tmp_path_factory):
    """A cached-mode linear probe with all three trackers, from the command line."""
    out = tmp_path_factory.mktemp("linear_trackers")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        for key in ("MLFLOW_TRACKING_URI", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
            mp.delenv(key, raising=False)
        result = CliRunner().invoke(app, ["eval", "linear", "--encoder", str(tiny_encoder), "--out", str(out),
                                          "--tracker", "wandb", "--tracker", "mlflow", "--tracker", "tensorboard",
                                          *LINEAR])
    assert result.exit_code == 0, result.output
    return out


def _jsonl_loss(out: Path) -> list[tuple[int, float]]:
    return [(rec["it"], rec["loss"]) for rec in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


def _same(series: list[tuple[int, float]], logged: list[tuple[int, float]]) -> bool:
    """The same steps, and values equal to float32 precision (TensorBoard stores float32)."""
    return [s for s, _ in series] == [s for s, _ in logged] and \
        [v for _, v in series] == pytest.approx([v for _, v in logged], rel=1e-6)


def _record(out: Path) -> dict:
    (path,) = [p for p in out.glob("*.json") if p.name != "skipped_files.json"]
    return json.loads(path.read_text())


def _mlflow_history(out: Path, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    with mock.patch.dict(os.environ, {"MLFLOW_ALLOW_FILE_STORE": "true"}):  # MLflow 3 opens a file store only so
        client = MlflowClient(f"file://{out / 'mlruns'}")
        (run,) = client.search_runs([client.get_experiment_by_name("mimbench").experiment_id])
        assert run.data.tags[trackers.RUN_TAG] == trackers.run_key(out)
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def _wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` transaction log: wandb's LevelDB-style log (a 7-byte header, then 32 KiB
    blocks of chunks, each a 7-byte header of crc32, little-endian length and type: 1 full, 2 first, 3
    middle, 4 last), each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, records = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_history(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("wandb/offline-run-*/run-*.wandb")):  # a continued run adds a directory
        assert path.name == f"run-{trackers.run_key(out)}.wandb"
        rows += [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
                 for rec in _wandb_records(path) if rec.WhichOneof("record_type") == "history"]
    return rows


def _tensorboard_scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for path in sorted((out / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            events += [(e.step, e.value) for e in acc.Scalars(tag)]
    return events


def test_mlflow_holds_the_logged_loss_and_the_record(linear_run):
    logged = _jsonl_loss(linear_run)
    assert len(logged) >= 4
    assert _same(_mlflow_history(linear_run, "loss"), logged)
    top1 = _record(linear_run)["metrics"]["top1"]
    assert [v for _, v in _mlflow_history(linear_run, "final/top1")] == pytest.approx([top1])


def test_wandb_offline_run_holds_the_logged_loss_and_the_record(linear_run):
    rows = _wandb_history(linear_run)
    assert [r["loss"] for r in rows if "loss" in r] == pytest.approx([loss for _, loss in _jsonl_loss(linear_run)])
    assert [r["final/top1"] for r in rows if "final/top1" in r] == \
        pytest.approx([_record(linear_run)["metrics"]["top1"]])


def test_tensorboard_holds_the_logged_loss_and_the_record(linear_run):
    assert _same(_tensorboard_scalars(linear_run, "loss"), _jsonl_loss(linear_run))
    assert [v for _, v in _tensorboard_scalars(linear_run, "final/top1")] == \
        pytest.approx([_record(linear_run)["metrics"]["top1"]])


def test_resumed_pretraining_continues_the_same_mlflow_and_wandb_runs(tmp_path):
    from pretrain.main import run_pretrain

    cfg = "pretrain/configs/mae_micro_fmnist.py"
    over = ["data.limit=64", "runtime.log_every=1", "runtime.progress=False", "runtime.trackers=['mlflow','wandb']"]
    run_pretrain(cfg, out=tmp_path, overrides=over + ["schedule.epochs=2", "schedule.warmup_epochs=1"])
    first = _jsonl_loss(tmp_path)
    run_pretrain(cfg, out=tmp_path, overrides=over + ["schedule.epochs=3", "schedule.warmup_epochs=1"], resume=True)
    logged = _jsonl_loss(tmp_path)
    assert len(logged) > len(first) and logged[:len(first)] == first
    assert _same(_mlflow_history(tmp_path, "loss"), logged)  # one MLflow run over both processes' steps
    assert [r["loss"] for r in _wandb_history(tmp_path) if "loss" in r] == pytest.approx([v for _, v in logged])


def test_a_missing_tracker_package_is_refused_before_any_work(tiny_encoder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if it were not installed
    with pytest.raises(MimbenchError, match="needs the wandb package") as err:
        run_eval("linear", encoder=tiny_encoder, config="eval_configs/demo/linear_fmnist.py",
                 data="builtin:fashion-mnist", out=tmp_path / "run", overrides=["runtime.trackers=['wandb']"])
    assert "pip install 'mimbench[trackers]'" in err.value.fix
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    result = CliRunner().invoke(app, ["pretrain", "--config", "pretrain/configs/mae_micro_fmnist.py",
                                      "--out", str(tmp_path / "pre"), "--tracker", "wandb"], terminal_width=200)
    assert result.exit_code == 2 and "mimbench[trackers]" in " ".join(result.output.split())
    assert not (tmp_path / "pre" / "log.jsonl").exists()


def test_an_unknown_tracker_is_refused_by_the_cli_and_the_schema(tmp_path):
    result = CliRunner().invoke(app, ["pretrain", "--config", "pretrain/configs/mae_micro_fmnist.py",
                                      "--out", str(tmp_path), "--tracker", "neptune"], terminal_width=200)
    said = " ".join(result.output.replace("│", " ").split())  # the message as one line, out of its box
    assert result.exit_code == 2 and "'neptune' is not one of 'tensorboard', 'wandb', 'mlflow'" in said
    with pytest.raises(MimbenchError, match="runtime.trackers"):
        load_config("eval_configs/demo/linear_fmnist.py", ["runtime.trackers=['neptune']"], kind="linear")


def test_the_segmentation_runner_config_gets_the_three_backends(tmp_path):
    cfg = load_config("eval_configs/segmentation/demo_fmnist_seg.py",
                      ["runtime.trackers=['tensorboard','wandb','mlflow']"], kind="segment")
    trackers.add_to_runner_config(cfg, trackers.selected(cfg.get("runtime")), tmp_path)
    backends = cfg.visualizer.vis_backends
    assert [b["type"] for b in backends] == ["LocalVisBackend", "TensorboardVisBackend", "WandbVisBackend",
                                             "MLflowVisBackend"]
    tb, wb, ml = backends[1:]
    assert tb["save_dir"] == str(tmp_path / "tensorboard")
    assert wb["init_kwargs"]["mode"] == "offline" and wb["init_kwargs"]["dir"] == str(tmp_path)
    assert wb["init_kwargs"]["id"] == trackers.run_key(tmp_path) == ml["tags"][trackers.RUN_TAG]
    assert ml["save_dir"] == str(tmp_path / "mlruns") and ml["tracking_uri"] is None  # mmengine's file:<save_dir>
    # none selected: the config is left as mmseg wrote it
    plain = load_config("eval_configs/segmentation/demo_fmnist_seg.py", kind="segment")
    trackers.add_to_runner_config(plain, trackers.selected(plain.get("runtime")), tmp_path)
    assert "visualizer" not in plain


def _seg_data(root: Path, size=(64, 64)) -> Path:
    """An ADE20K-layout folder of random images and labels (classes 0..10)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("training", 4), ("validation", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / split / f"{i}.jpg")
            Image.fromarray(rng.integers(0, 11, size, dtype=np.uint8)).save(root / "annotations" / split / f"{i}.png")
    return root


def test_segmentation_logs_mmengine_scalars_and_the_record_to_the_trackers(dist_encoder, tmp_path):
    from mimbench.evals.segment import run_segment

    out = tmp_path / "run"
    record = run_segment(encoder=dist_encoder, config="eval_configs/segmentation/demo_fmnist_seg.py",
                         data=str(_seg_data(tmp_path / "seg")), out=out, aug_test=False,
                         overrides=["train_cfg.max_iters=3", "train_dataloader.batch_size=2",
                                    "default_hooks.logger.interval=1", "runtime.trackers=['mlflow','tensorboard','wandb']"])
    # mmengine's own local copy of what its logger hook sent to every backend
    (local,) = out.glob("mmseg/*/vis_data/scalars.json")
    logged = [(row["step"], row["loss"]) for row in map(json.loads, local.read_text().splitlines()) if "loss" in row]
    assert len(logged) == 3
    assert _same(_mlflow_history(out, "loss"), logged)
    assert _same(_tensorboard_scalars(out, "loss"), logged)
    assert [v for _, v in _mlflow_history(out, "final/mIoU")] == pytest.approx([record["metrics"]["mIoU"]])
    assert [r["loss"] for r in _wandb_history(out) if "loss" in r] == pytest.approx([v for _, v in logged], rel=1e-6)
