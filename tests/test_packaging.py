"""What ``pip install mimbench`` asks of an environment: ranges, not pins; the tested set and the lowest claimed
set as constraints files that satisfy them; an installed torch below the lowest refused before any work."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from typer.testing import CliRunner

from mimbench import env
from mimbench.cli import app

ROOT = Path(__file__).resolve().parent.parent


def _runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def _pins(name: str) -> dict[str, Version]:
    """``package==version`` lines of a constraints file under requirements/, by canonical name."""
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{name}: {line} is not an exact pin"
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _lower_bound(req: Requirement) -> Version:
    (low,) = [Version(s.version) for s in req.specifier if s.operator == ">="]
    return low


def test_no_runtime_dependency_is_pinned_exactly():
    reqs = _runtime_requirements()
    assert len(reqs) >= 18
    pinned = [str(r) for r in reqs if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not pinned, f"runtime dependencies pinned exactly (they would replace a user's own): {pinned}"
    unbounded = [str(r) for r in reqs if not any(s.operator == ">=" for s in r.specifier)]
    assert not unbounded, f"runtime dependencies without a tested lower bound: {unbounded}"


def test_the_lock_file_pins_every_runtime_dependency_within_its_range():
    lock = _pins("lock.txt")
    missing = [r.name for r in _runtime_requirements() if canonicalize_name(r.name) not in lock]
    assert not missing, f"runtime dependencies the lock file does not pin: {missing}"
    outside = [f"{r} (locked {lock[canonicalize_name(r.name)]})" for r in _runtime_requirements()
               if not r.specifier.contains(lock[canonicalize_name(r.name)], prereleases=True)]
    assert not outside, f"locked versions outside pyproject's ranges: {outside}"
    assert "mimbench" not in lock


def test_the_lowest_set_is_every_lower_bound_and_torch_291():
    lowest = _pins("lowest.txt")
    reqs = _runtime_requirements()
    assert {canonicalize_name(r.name) for r in reqs} == set(lowest)
    wrong = [f"{r.name}: lowest.txt {lowest[canonicalize_name(r.name)]}, pyproject >= {_lower_bound(r)}"
             for r in reqs if lowest[canonicalize_name(r.name)] != _lower_bound(r)]
    assert not wrong, "requirements/lowest.txt must pin each dependency at its lower bound: " + "; ".join(wrong)
    assert lowest["torch"] == Version("2.9.1") and lowest["torchvision"] == Version("0.24.1")
    assert Version(env.MIN_TORCH) == lowest["torch"]


@pytest.mark.parametrize("version", ["2.8.0+cu128", "2.9.0", "1.13.1"])
def test_a_torch_below_the_lowest_is_refused_at_cli_start(monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    result = CliRunner().invoke(app, ["env"])
    assert result.exit_code == 2, result.output
    assert f"torch {version}" in result.output and "2.9.1 or newer" in result.output
    assert "pip install 'torch>=2.9.1'" in result.output


@pytest.mark.parametrize("version", ["2.9.1", "2.9.1+cpu", "2.10.0", "2.14.1+cu130"])
def test_a_torch_at_or_above_the_lowest_passes(monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    env.check_torch()
