"""Checks that hold for mimbench wherever it is installed: run in the normal suite against the checkout, and by the
CI wheel job (.ci/wheel, ``pytest -m wheel``) against the built wheel installed at the lowest supported versions,
from a folder outside the repository. Self-contained: no conftest, no test helpers."""
from __future__ import annotations

from pathlib import Path

import pytest

from mimbench import paths
from mimbench.config import load_config
from mimbench.env import MIN_TORCH, check_torch

pytestmark = pytest.mark.wheel


def test_the_installed_torch_is_supported():
    check_torch()
    import torch

    assert tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:3]) >= \
        tuple(int(p) for p in MIN_TORCH.split("."))


def test_every_shipped_config_is_found_and_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = paths.shipped_configs()
    assert {"linear/mae_vit-b_in1k", "demo/knn_fmnist", "pretrain/mae_micro_fmnist"} <= set(names)
    for name, path in names.items():
        assert paths.resolve_config(name) == path
        assert load_config(path).filename == str(path)  # every _base_ (relative or by name) found where installed
    assert load_config(paths.resolve_config("linear/mae_vit-h_in1k"), kind="linear").schedule.epochs == 50


def test_a_users_config_inherits_a_shipped_one_by_name(tmp_path):
    mine = tmp_path / "mine.py"
    mine.write_text('_base_ = ["demo/knn_fmnist"]\nknn = dict(k=5)\n')
    cfg = load_config(mine, kind="knn")
    assert cfg.knn.k == 5 and cfg.knn.temperature == 0.07
    assert Path(paths.resolve_config("demo/knn_fmnist")).is_file()
