"""Where the shipped config files are, and the names they go by: the one place that knows the layout.

The evaluation configs live in ``eval_configs/`` at the top of the source tree and the pre-training configs in
``pretrain/configs/``. Both ship in the wheel: ``eval_configs/`` becomes the package data folder
``mimbench/eval_configs/`` (setup.py maps it), ``pretrain/configs/`` stays inside the ``pretrain`` package, which is
installed beside ``mimbench``. An editable install (or the source tree on ``PYTHONPATH``) reads them from the
checkout.

Commands take a config as a path (relative to the working directory, or a path such as
``eval_configs/demo/knn_fmnist.py`` that exists under the source tree) or as the name of a shipped config:
its path below ``eval_configs/`` without ``.py`` (``linear/mae_vit-b_in1k``), or ``pretrain/`` and its path
below ``pretrain/configs/`` (``pretrain/mae_vit-b_in1k_800ep``). ``mimbench configs`` lists the names.
"""
from __future__ import annotations

import difflib
from pathlib import Path

from mimbench.errors import MimbenchError

#: The ``mimbench`` package folder; a wheel installs the evaluation configs below it.
PACKAGE_ROOT = Path(__file__).resolve().parent
#: The folder holding ``mimbench/`` and ``pretrain/``: the repository root of a checkout, site-packages when
#: installed from the wheel.
REPO_ROOT = PACKAGE_ROOT.parent
#: The config folders, relative to the repository root.
EVAL_CONFIGS = Path("eval_configs")
PRETRAIN_CONFIGS = Path("pretrain") / "configs"
#: The first part of a pre-training config's name (``pretrain/mae_vit-b_in1k_800ep``).
PRETRAIN_GROUP = "pretrain"
#: Folders of parts that other configs inherit rather than configs to run; left out of the listing.
BASE_FOLDER = "_base_"


def eval_configs_root() -> Path:
    """The evaluation configs' folder: ``mimbench/eval_configs`` when installed from the wheel, else
    ``eval_configs/`` of the checkout."""
    shipped = PACKAGE_ROOT / EVAL_CONFIGS
    return shipped if shipped.is_dir() else REPO_ROOT / EVAL_CONFIGS


def pretrain_configs_root() -> Path:
    """The pre-training configs' folder (inside the ``pretrain`` package, in a checkout and installed alike)."""
    return REPO_ROOT / PRETRAIN_CONFIGS


def shipped_path(rel: str | Path) -> Path:
    """A path relative to the source tree (``eval_configs/...``, ``pretrain/configs/...``) where it is now."""
    parts = Path(rel).parts
    if parts[:1] == EVAL_CONFIGS.parts:
        return eval_configs_root().joinpath(*parts[1:])
    if parts[:2] == PRETRAIN_CONFIGS.parts:
        return pretrain_configs_root().joinpath(*parts[2:])
    return REPO_ROOT / rel


def repo_file(rel: str | Path) -> Path:
    """The shipped file at ``rel`` relative to the source tree (``eval_configs/demo/knn_fmnist.py``), which must
    exist (MimbenchError naming the path otherwise)."""
    path = shipped_path(rel)
    if not path.exists():
        raise MimbenchError(f"{rel} was not found among the configs shipped with mimbench ({path}).",
                            "Reinstall mimbench (pip install mimbench-*.whl, or pip install -e . in a checkout); "
                            "`mimbench configs` lists the configs it ships.")
    return path


def eval_config(rel: str | Path) -> Path:
    """An evaluation config, ``rel`` below ``eval_configs/`` (e.g. ``demo/knn_fmnist.py``)."""
    return repo_file(EVAL_CONFIGS / rel)


def pretrain_config(name: str | Path) -> Path:
    """A pre-training config, ``name`` below ``pretrain/configs/`` (e.g. ``mae_tiny_fmnist.py``)."""
    return repo_file(PRETRAIN_CONFIGS / name)


def _roots() -> tuple[tuple[str, Path], ...]:
    return (("", eval_configs_root()), (PRETRAIN_GROUP + "/", pretrain_configs_root()))


def shipped_configs() -> dict[str, Path]:
    """Every shipped config to run, by name (sorted): ``linear/mae_vit-b_in1k``, ``pretrain/mae_tiny_fmnist``, ...
    The ``_base_`` parts are not listed (their names still resolve)."""
    found = {}
    for prefix, root in _roots():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            if BASE_FOLDER not in rel.parts and rel.name != "__init__":
                found[prefix + rel.as_posix()] = path
    return dict(sorted(found.items()))


def config_by_name(name: str) -> Path:
    """The shipped config called ``name`` (``linear/mae_vit-b_in1k``, ``.py`` allowed; a ``_base_`` part too).

    MimbenchError naming the closest names otherwise."""
    key = name.strip().removesuffix(".py").strip("/")
    for prefix, root in _roots():
        if key.startswith(prefix) and key[len(prefix):] and (root / f"{key[len(prefix):]}.py").is_file():
            return root / f"{key[len(prefix):]}.py"
    near = difflib.get_close_matches(key, list(shipped_configs()), n=5, cutoff=0.5)
    hint = f"Did you mean {', '.join(near)}? " if near else ""
    raise MimbenchError(f"{name!r} is neither a config file nor the name of a config shipped with mimbench.",
                        f"{hint}`mimbench configs` lists the shipped configs; a path to your own config file works "
                        "too.")


def resolve_config(path: str | Path) -> Path:
    """A config as a command takes it: ``path`` when it exists (or is absolute: the loader then names it), else
    the same path under the source tree (``eval_configs/demo/knn_fmnist.py`` typed from another folder), else
    the shipped config of that name (:func:`config_by_name`, which names near matches when there is none)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    candidate = shipped_path(path)
    return candidate if candidate.exists() else config_by_name(str(path))


def config_summary(path: Path) -> str:
    """The first line of a config's leading comment (which says what it reproduces), or ``""``."""
    for line in path.read_text().splitlines():
        if line.strip():
            return line.strip().lstrip("#").strip() if line.lstrip().startswith("#") else ""
    return ""


def relative(path: str | Path) -> str:
    """``path`` relative to the source tree when it is a shipped file or inside the checkout (for messages and
    job files)."""
    resolved = Path(path).resolve()
    for rel, root in ((EVAL_CONFIGS, eval_configs_root()), (Path(), REPO_ROOT)):
        try:
            return str(rel / resolved.relative_to(root.resolve()))
        except ValueError:
            continue
    return str(path)


__all__ = ["BASE_FOLDER", "EVAL_CONFIGS", "PACKAGE_ROOT", "PRETRAIN_CONFIGS", "PRETRAIN_GROUP", "REPO_ROOT",
           "config_by_name", "config_summary", "eval_config", "eval_configs_root", "pretrain_config",
           "pretrain_configs_root", "relative", "repo_file", "resolve_config", "shipped_configs", "shipped_path"]
