"""``mimbench env``: every field named, the same values the run records carry, the amp that ``auto`` picks."""
from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from mimbench import env
from mimbench.cli import app
from mimbench.fastpath import resolve_amp

runner = CliRunner()
FIELDS = ("mimbench", "python", "torch", "torchvision", "cuda", "cudnn", "timm", "mmengine", "mmseg", "mmcv",
          "mmcv compiled ops", "devices", "bf16", "amx", "tf32", "fp32 matmul precision", "amp auto")


def _fields(output: str) -> dict[str, str]:
    """The ``field  value`` lines of the command's output (fields are separated from values by 2+ spaces)."""
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in output.splitlines() if line.strip())


@pytest.mark.parametrize("cpu_bf16", ["0", "1"])
def test_env_names_every_field_and_the_amp_auto_picks(monkeypatch, cpu_bf16):
    monkeypatch.setenv("MIMBENCH_CPU_BF16", cpu_bf16)  # both answers of the CPU detection
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0, result.output
    fields = _fields(result.output)
    assert tuple(fields) == FIELDS
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert fields["amp auto"] == f"{resolve_amp('auto', device)} (on {device})"
    if device == "cpu":
        assert fields["amp auto"].split()[0] == ("bf16" if cpu_bf16 == "1" else "none")
        assert fields["bf16"] == ("yes" if cpu_bf16 == "1" else "no") and fields["tf32"] == "n/a"
    info = env.environment_info()
    for key in ("torch", "torchvision", "timm", "mmengine", "mmseg", "mmcv"):
        assert fields[key] == (info["versions"][key] or "not installed")
    assert fields["cuda"].startswith(torch.version.cuda or "none")
    assert fields["torch"] == torch.__version__.split("+")[0]


def test_records_carry_what_env_prints():
    from mimbench.results.records import new_record

    rec = new_record("bench", protocol={"name": "p", "sha256": None}, encoder=None, dataset={"name": "d"},
                     metrics={}, seed=0, started=0.0, finished=1.0)
    report = env.env_report()
    for key in ("cuda", "cudnn", "mmengine", "mmcv", "mmcv_ops", "torchvision"):
        assert rec["versions"][key] == report["versions"][key]
    for key in ("bf16", "amx", "tf32", "float32_matmul_precision"):
        assert rec["hardware"][key] == report["hardware"][key]


def test_mmcv_compiled_ops_are_found_as_the_ext_module(monkeypatch, tmp_path):
    class Spec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(env.util, "find_spec", lambda name: Spec())
    assert env.mmcv_info()[2] is False  # mmcv-lite: no compiled extension
    (tmp_path / "_ext.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert env.mmcv_info()[2] is True
    monkeypatch.setattr(env.util, "find_spec", lambda name: None)
    assert env.mmcv_info()[2] is False


def test_amx_is_read_from_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(env, "_cpu_flags", lambda: frozenset({"avx512f", "amx_tile", "amx_bf16"}))
    assert env.precision_support()["amx"] is True
    monkeypatch.setattr(env, "_cpu_flags", lambda: frozenset({"avx2"}))
    assert env.precision_support()["amx"] is False


def test_env_help_has_an_example():
    result = runner.invoke(app, ["env", "--help"])
    assert result.exit_code == 0 and "Example: mimbench env" in result.output
