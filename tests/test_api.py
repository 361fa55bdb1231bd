"""The Python API (mimbench.pretrain / mimbench.evaluate): the same record as the CLI, bad input refused first."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import mimbench
from mimbench.cli import app
from mimbench.errors import MimbenchError

REPO = Path(__file__).resolve().parent.parent
KNN_DEMO = "eval_configs/demo/knn_fmnist.py"
MICRO_MAE = REPO / "pretrain/configs/mae_micro_fmnist.py"
SMALL = {"data.limit_train": 200, "data.limit_val": 50}
#: Record fields that differ between two runs of the same inputs: the run's id and its wall-clock times.
RUN_FIELDS = ("run_id", "started", "finished", "duration_s")


def test_import_mimbench_and_the_api_load_neither_torch_nor_mmengine():
    code = ("import sys, mimbench, mimbench.api; mimbench.evaluate; mimbench.pretrain; "
            "print(sorted(m for m in ('torch', 'timm', 'mmengine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_evaluate_gives_the_record_the_cli_writes(tiny_encoder, tmp_path):
    result = CliRunner().invoke(app, ["eval", "knn", "--encoder", str(tiny_encoder), "--config", KNN_DEMO,
                                      "--data", "builtin:fashion-mnist", "--out", str(tmp_path / "cli"),
                                      "--set", "data.limit_train=200", "--set", "data.limit_val=50"])
    assert result.exit_code == 0, result.output
    (written,) = (tmp_path / "cli").glob("knn-*.json")
    cli_record = json.loads(written.read_text())

    record = mimbench.evaluate("knn", tiny_encoder, data="builtin:fashion-mnist", config=KNN_DEMO,
                               out=tmp_path / "api", overrides=SMALL)
    (api_written,) = (tmp_path / "api").glob("knn-*.json")
    assert json.loads(api_written.read_text()) == record
    assert record["run_id"] != cli_record["run_id"]
    same = lambda r: {k: v for k, v in r.items() if k not in RUN_FIELDS}  # noqa: E731
    assert same(record) == same(cli_record)
    assert record["protocol"]["overrides"] == ["data.limit_train=200", "data.limit_val=50"]
    assert record["dataset"]["sizes"] == {"train": 200, "val": 50}


def test_options_left_unset_on_the_command_line_are_not_checked_against_their_choices(tiny_encoder, tmp_path):
    """``eval linear`` without ``--pool`` / ``--layers`` passes them as None: the config's values apply."""
    result = CliRunner().invoke(app, ["eval", "linear", "--encoder", str(tiny_encoder), "--out", str(tmp_path),
                                      "--set", "data.limit_train=128", "--set", "data.limit_val=32",
                                      "--set", "optim.batch_size=32"])
    assert result.exit_code == 0, result.output
    (written,) = tmp_path.glob("linear-*.json")
    assert json.loads(written.read_text())["protocol"]["overrides"] == ["data.limit_train=128", "data.limit_val=32",
                                                                     "optim.batch_size=32"]
    with pytest.raises(MimbenchError, match="pool='max' is not one of"):
        mimbench.evaluate("linear", tiny_encoder, out=tmp_path / "bad", pool="max")


def test_evaluate_defaults_are_the_cli_defaults(tiny_encoder, tmp_path, monkeypatch):
    """No data/config/out: the task's default data and demo config (as the CLI), out under ./runs/eval."""
    monkeypatch.chdir(tmp_path)
    record = mimbench.evaluate("knn", tiny_encoder, overrides=["data.limit_train=64", "data.limit_val=32"])
    assert record["dataset"]["name"] == "builtin:fashion-mnist"
    assert Path(record["protocol"]["config"]).resolve() == (REPO / KNN_DEMO).resolve()
    assert list((tmp_path / "runs/eval/knn/tiny").glob("knn-*.json"))


def test_pretrain_returns_an_encoder_file_that_load_encoder_reads(tmp_path):
    import torch

    path = mimbench.pretrain(MICRO_MAE, tmp_path / "mae",
                             overrides={"schedule.epochs": 2, "runtime.log_every": 2, "data.limit": 64})
    assert path == tmp_path / "mae" / "encoder.safetensors"
    encoder = mimbench.load_encoder(path)
    assert encoder(torch.zeros(1, 3, 32, 32)).shape == (1, 64)
    meta = mimbench.read_metadata(path)
    assert meta["technique"] == "mae" and float(meta["epochs"]) == 2  # the override reached the run


@pytest.mark.parametrize("call,match", [
    (dict(task="segmentation"), "Unknown evaluation task 'segmentation'"),
    (dict(encoder="missing.safetensors"), "missing.safetensors does not exist"),
    (dict(overrides={"data.limit_trian": 5}), "data.limit_trian"),
    (dict(overrides=["data.limit_train"]), "not of the form key=value"),
    (dict(overrides="data.limit_train=5"), "one string"),
    (dict(overrides={3: 5}), "dotted strings"),
    (dict(launcher="none"), "no option 'launcher'"),
    (dict(task="segment", launcher="mpi"), "'mpi' is not one of"),
])
def test_evaluate_refuses_bad_input_before_any_work(tiny_encoder, tmp_path, call, match):
    args = {"task": "knn", "encoder": tiny_encoder, "out": tmp_path / "run", **call}
    if isinstance(args["encoder"], str):  # a file name: one that is not there
        args["encoder"] = tmp_path / args["encoder"]
    with pytest.raises(MimbenchError, match=match):
        mimbench.evaluate(args.pop("task"), args.pop("encoder"), **args)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config,overrides,match", [
    ("no_such_config.py", None, "neither a config file nor the name of a config shipped"),
    (MICRO_MAE, {"schedule.epoch": 1}, "schedule.epoch"),
    (MICRO_MAE, "schedule.epochs=1", "one string"),
])
def test_pretrain_refuses_bad_input_before_any_work(tmp_path, config, overrides, match):
    with pytest.raises(MimbenchError, match=match):
        mimbench.pretrain(config, tmp_path / "run", overrides=overrides)
    assert not (tmp_path / "run").exists()
