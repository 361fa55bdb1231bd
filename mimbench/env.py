"""What a result was produced with: library versions, code commit, hardware.

Every run record carries this so that a number can be traced back to the code and machine
that produced it. Nothing here may fail: a missing git binary, a source tree that is not a
checkout or a missing optional library all just leave the field empty.
"""
from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch

from mimbench import __version__

_DISTRIBUTIONS = {"torch": "torch", "timm": "timm", "mmseg": "mmsegmentation", "mimbench": "mimbench"}


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@lru_cache(maxsize=1)
def _git_state() -> tuple[str | None, bool | None]:
    # Only report a commit when the mimbench package itself lives in the checkout's top level;
    # an installed copy inside some unrelated repository (e.g. a venv in a project) must not
    # be credited with that repository's commit.
    source_root = Path(__file__).resolve().parent.parent
    top = _git(["rev-parse", "--show-toplevel"], source_root)
    if not top or Path(top).resolve() != source_root:
        return None, None
    commit = _git(["rev-parse", "HEAD"], source_root)
    status = _git(["status", "--porcelain", "--untracked-files=no"], source_root)
    return commit or None, (bool(status) if status is not None else None)


def git_commit() -> str | None:
    """Commit hash of the mimbench checkout the code runs from, or None (installed copy, no git)."""
    return _git_state()[0]


def hardware_info() -> dict:
    """``{"device": "cuda"|"cpu", "count": devices used, "name": model name, ...}``.

    ``count`` is the distributed world size when launched with torchrun (WORLD_SIZE), otherwise 1
    (a single process uses one device); ``visible`` adds how many GPUs the process could see.
    """
    world = int(os.environ.get("WORLD_SIZE", "0") or 0)
    if torch.cuda.is_available():
        return {"device": "cuda", "count": world or 1, "name": torch.cuda.get_device_name(0),
                "visible": torch.cuda.device_count()}
    return {"device": "cpu", "count": world or 1, "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}


def environment_info() -> dict:
    """``{"versions": {python, torch, timm, mmseg, mimbench, git_commit, git_dirty}, "hardware": {...}}``.

    A library that is not installed is reported as None; never raises.
    """
    versions: dict[str, object] = {"python": platform.python_version()}
    for key, dist in _DISTRIBUTIONS.items():
        versions[key] = _dist_version(dist)
    if versions["mimbench"] is None:  # running from a source tree that was never pip-installed
        versions["mimbench"] = __version__
    commit, dirty = _git_state()
    versions["git_commit"] = commit
    versions["git_dirty"] = dirty
    return {"versions": versions, "hardware": hardware_info()}
