"""Where the repository's config files are: the one place that knows the layout.

The evaluation configs live in ``eval_configs/`` at the repository root and the pre-training configs in
``pretrain/configs/``; both ship with an editable install (``pip install -e .``). Commands take config
paths relative to the working directory; a path that does not exist there but does under the
repository root (``eval_configs/demo/knn_fmnist.py`` typed from another folder) is read from there.
"""
from __future__ import annotations

from pathlib import Path

from mimbench.errors import MimbenchError

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The config folders, relative to the repository root.
EVAL_CONFIGS = Path("eval_configs")
PRETRAIN_CONFIGS = Path("pretrain") / "configs"


def repo_file(rel: str | Path) -> Path:
    """``REPO_ROOT / rel``, which must exist (MimbenchError naming the path otherwise)."""
    path = REPO_ROOT / rel
    if not path.exists():
        raise MimbenchError(f"{rel} was not found under the repository root {REPO_ROOT}.",
                            "Run from an editable install of the repository (pip install -e .), which has "
                            "eval_configs/ and pretrain/configs/.")
    return path


def eval_config(rel: str | Path) -> Path:
    """An evaluation config, ``rel`` below ``eval_configs/`` (e.g. ``demo/knn_fmnist.py``)."""
    return repo_file(EVAL_CONFIGS / rel)


def pretrain_config(name: str | Path) -> Path:
    """A pre-training config, ``name`` below ``pretrain/configs/`` (e.g. ``mae_tiny_fmnist.py``)."""
    return repo_file(PRETRAIN_CONFIGS / name)


def resolve_config(path: str | Path) -> Path:
    """``path`` as given when it exists, else the same relative path under the repository root when that
    exists, else ``path`` unchanged (the config loader then names it in its error)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    candidate = REPO_ROOT / path
    return candidate if candidate.exists() else path


def relative(path: str | Path) -> str:
    """``path`` relative to the repository root when it is inside it (for messages and job files)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


__all__ = ["EVAL_CONFIGS", "PRETRAIN_CONFIGS", "REPO_ROOT", "eval_config", "pretrain_config", "relative", "repo_file", "resolve_config"]
