"""What a result was produced with: library versions, code commit, hardware.

Every run record carries this so that a number can be traced back to the code and machine
that produced it, and ``mimbench env`` prints the same values (:func:`env_report`). Nothing here
may fail: a missing git binary, a source tree that is not a checkout or a missing optional library
all just leave the field empty. Nothing here imports mmcv, mmseg or mmengine: their versions come
from the installed distributions, and mmcv's compiled ops are looked for as files.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
from functools import lru_cache
from importlib import metadata, util
from pathlib import Path

import torch

from mimbench import __version__
from mimbench.errors import MimbenchError
from mimbench.fastpath import cpu_flags, cpu_supports_bf16, resolve_amp, tf32_enabled

_DISTRIBUTIONS = {"torch": "torch", "torchvision": "torchvision", "timm": "timm", "mmengine": "mmengine",
                  "mmseg": "mmsegmentation", "mimbench": "mimbench"}
#: The distributions that provide the ``mmcv`` package: full mmcv (with compiled ops), its 1.x name, the
#: pure-Python mmcv-lite.
_MMCV_DISTRIBUTIONS = ("mmcv", "mmcv-full", "mmcv-lite")
#: /proc/cpuinfo flags of Intel AMX (the tile unit that runs bf16 matrix products on Sapphire Rapids and later).
AMX_FLAGS = frozenset({"amx_bf16", "amx_tile"})


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


def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it cannot be read, e.g. macOS)."""
    return cpu_flags()


def mmcv_info() -> tuple[str | None, str | None, bool]:
    """``(version, distribution, compiled ops present)`` of the installed mmcv, ``(None, None, False)``
    without one. The ops are the ``mmcv._ext`` extension module that full mmcv builds and mmcv-lite lacks
    (mimbench.seg then supplies the few ops mmseg imports); looked for as a file, mmcv is not imported."""
    dist = next((d for d in _MMCV_DISTRIBUTIONS if _dist_version(d)), None)
    try:
        spec = util.find_spec("mmcv")  # a top-level name: found without importing it
    except (ImportError, ValueError):
        spec = None
    ops = False
    if spec is not None and spec.submodule_search_locations:
        ops = any(any(Path(loc).glob("_ext.*")) for loc in spec.submodule_search_locations)
    return (_dist_version(dist) if dist else None), dist, ops


def precision_support() -> dict:
    """What the first device computes natively: ``bf16``, ``tf32`` (CUDA compute capability >= 8.0; None
    on CPU), ``amx`` (the CPU's AMX tiles), and ``float32_matmul_precision`` (torch's setting: "highest"
    keeps fp32 matrix products in fp32, "high" lets them use TF32 or bf16); ``tf32_enabled``: whether this
    process lets fp32 matrix products use TF32 (:func:`mimbench.fastpath.configure_tf32`)."""
    flags = _cpu_flags()
    support: dict[str, object] = {"amx": bool(AMX_FLAGS & flags),
                                  "float32_matmul_precision": torch.get_float32_matmul_precision(),
                                  "tf32_enabled": tf32_enabled()}
    if torch.cuda.is_available():
        support["bf16"] = bool(torch.cuda.is_bf16_supported())
        support["tf32"] = torch.cuda.get_device_capability(0) >= (8, 0)
    else:
        support["bf16"] = cpu_supports_bf16()
        support["tf32"] = None
    return support


def hardware_info() -> dict:
    """``{"device": "cuda"|"cpu", "count": devices used, "name": model name, ...}`` and
    :func:`precision_support`'s fields.

    ``count`` is the distributed world size when launched with torchrun (WORLD_SIZE), otherwise 1
    (a single process uses one device); ``visible`` adds how many GPUs the process could see.
    """
    world = int(os.environ.get("WORLD_SIZE", "0") or 0)
    if torch.cuda.is_available():
        info = {"device": "cuda", "count": world or 1, "name": torch.cuda.get_device_name(0),
                "visible": torch.cuda.device_count()}
    else:
        info = {"device": "cpu", "count": world or 1, "name": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads()}
    return {**info, **precision_support()}


def environment_info() -> dict:
    """``{"versions": {python, torch, torchvision, cuda, cudnn, timm, mmengine, mmseg, mmcv, mmcv_ops, mimbench,
    git_commit, git_dirty}, "hardware": {...}}``.

    A library that is not installed is reported as None (``cuda``/``cudnn``: None for a CPU build of
    torch); ``mmcv_ops`` says whether mmcv's compiled ops are installed. Never raises.
    """
    versions: dict[str, object] = {"python": platform.python_version()}
    for key, dist in _DISTRIBUTIONS.items():
        versions[key] = _dist_version(dist)
    if versions["mimbench"] is None:  # running from a source tree that was never pip-installed
        versions["mimbench"] = __version__
    versions["cuda"] = torch.version.cuda
    versions["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    versions["mmcv"], _, versions["mmcv_ops"] = mmcv_info()
    commit, dirty = _git_state()
    versions["git_commit"] = commit
    versions["git_dirty"] = dirty
    return {"versions": versions, "hardware": hardware_info()}


def devices() -> list[str]:
    """One line per device this process can use: every visible GPU (name, memory, compute capability), or
    the CPU (model, threads)."""
    if not torch.cuda.is_available():
        return [f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"]
    lines = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        lines.append(f"cuda:{i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                     f"compute capability {props.major}.{props.minor}")
    return lines


def env_report() -> dict:
    """What ``mimbench env`` prints: :func:`environment_info` (the values every record carries), the
    devices, and the precision ``amp="auto"`` picks on the default device (``resolve_amp``)."""
    info = environment_info()
    device = info["hardware"]["device"]
    return {**info, "devices": devices(), "amp_auto": resolve_amp("auto", device)}


def _yes_no(value) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def format_env_report(report: dict) -> str:
    """:func:`env_report` as aligned ``field: value`` lines (a missing library reads "not installed")."""
    v, hw = report["versions"], report["hardware"]
    git = (f" (git {v['git_commit'][:12]}{', uncommitted changes' if v['git_dirty'] else ''})"
           if v["git_commit"] else "")
    rows = [("mimbench", f"{v['mimbench']}{git}"), ("python", v["python"])]
    rows += [(k, v[k] or "not installed") for k in ("torch", "torchvision")]
    rows += [("cuda", v["cuda"] or "none (CPU build of torch)"), ("cudnn", v["cudnn"] or "none")]
    rows += [(k, v[k] or "not installed") for k in ("timm", "mmengine", "mmseg", "mmcv")]
    rows += [("mmcv compiled ops", "present" if v["mmcv_ops"] else "absent (mimbench.seg supplies the ops mmseg "
              "needs)" if v["mmcv"] else "absent")]
    rows += [("devices", "; ".join(report["devices"]))]
    rows += [("bf16", _yes_no(hw["bf16"])), ("amx", _yes_no(hw["amx"])), ("tf32", _yes_no(hw["tf32"])),
             ("fp32 matmul precision", hw["float32_matmul_precision"]),
             ("amp auto", f"{report['amp_auto']} (on {hw['device']})")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {val}" for k, val in rows)


#: The lowest torch mimbench runs on: the lower bound of pyproject.toml's torch requirement, the version the CI
#: wheel job (.ci/wheel) installs (tests/test_packaging.py checks that the two agree).
MIN_TORCH = "2.9.1"


def _release(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string (``"2.9.1+cu128"`` -> ``(2, 9, 1)``)."""
    match = re.match(r"\d+(\.\d+)*", str(version))
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def check_torch() -> None:
    """Refuse (MimbenchError) an installed torch below :data:`MIN_TORCH`, before any command starts its work.

    pip keeps an environment's own torch when it satisfies the range, so an older torch can only come from an
    environment that broke the requirement after the install (or a ``--no-deps`` install)."""
    if _release(torch.__version__) < _release(MIN_TORCH):
        raise MimbenchError(
            f"mimbench needs torch {MIN_TORCH} or newer; this environment has torch {torch.__version__}.",
            f"Upgrade torch in this environment (pip install 'torch>={MIN_TORCH}' with the torchvision that matches "
            "it, from the index of your CUDA build), or install mimbench into a fresh virtual environment.")
