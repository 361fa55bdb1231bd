"""The shipped configs: in the wheel, by name on the command line and in ``_base_``, listed by ``mimbench configs``."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mimbench import paths
from mimbench.cli import app
from mimbench.config import load_config
from mimbench.errors import MimbenchError

ROOT = Path(__file__).resolve().parent.parent
TREES = {"eval_configs": "mimbench/eval_configs", "pretrain/configs": "pretrain/configs"}


def _tree_files() -> dict[str, str]:
    """Every config file of the source tree, as the path it must have in the wheel."""
    return {f"{dest}/{p.relative_to(ROOT / src).as_posix()}": str(p.relative_to(ROOT))
            for src, dest in TREES.items() for p in sorted((ROOT / src).rglob("*.py"))}


def _runnable(names) -> set[str]:
    return {n for n in names if "_base_" not in n.split("/")}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the source tree (the tree itself stays free of build output)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("mimbench", "pretrain", "eval_configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    str(src), "-w", str(out)], check=True, capture_output=True)
    (built,) = out.glob("mimbench-*.whl")
    return built


@pytest.fixture()
def installed(wheel, tmp_path, monkeypatch) -> Path:
    """The wheel unpacked as pip installs it (site-packages/mimbench, site-packages/pretrain), and mimbench.paths
    looking there, as it does when imported from that install."""
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(site)
    monkeypatch.setattr(paths, "PACKAGE_ROOT", site / "mimbench")
    monkeypatch.setattr(paths, "REPO_ROOT", site)
    return site


def test_the_wheel_holds_every_eval_and_pretrain_config(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
    missing = [src for dest, src in _tree_files().items() if dest not in names]
    assert not missing, f"configs missing from the wheel: {missing}"
    assert len(_tree_files()) >= 50
    assert not [n for n in names if n.startswith("eval_configs/")]  # no top-level package of that name


def test_installed_configs_resolve_by_name_and_inherit_from_the_installed_copy(installed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the source tree
    assert set(paths.shipped_configs()) == _runnable(n.removesuffix(".py") for n in _names_in_tree())
    linear = paths.resolve_config("linear/mae_vit-h_in1k")
    assert linear == installed / "mimbench" / "eval_configs" / "linear" / "mae_vit-h_in1k.py"
    cfg = load_config(linear, kind="linear")  # _base_ = ["./mae_vit-b_in1k.py"], read from the install
    assert cfg.optim.name == "lars" and cfg.schedule.epochs == 50
    knn = load_config(paths.resolve_config("eval_configs/demo/knn_fmnist.py"), kind="knn")  # ../_base_ chain
    assert knn.knn.k == 20
    grid = load_config(paths.resolve_config("reproduce/ddae_micro_fmnist"))  # _base_ by name: pretrain/...
    assert grid.model.name == "ddae_vit_micro_patch4_32"
    assert paths.pretrain_config("mae_micro_fmnist.py") == installed / "pretrain" / "configs" / "mae_micro_fmnist.py"


def _names_in_tree() -> list[str]:
    names = [p.relative_to(ROOT / "eval_configs").as_posix() for p in (ROOT / "eval_configs").rglob("*.py")]
    return names + [f"pretrain/{p.relative_to(ROOT / 'pretrain' / 'configs').as_posix()}"
                    for p in (ROOT / "pretrain" / "configs").rglob("*.py")]


@pytest.mark.parametrize("name, rel", [
    ("linear/mae_vit-b_in1k", "eval_configs/linear/mae_vit-b_in1k.py"),
    ("linear/mae_vit-b_in1k.py", "eval_configs/linear/mae_vit-b_in1k.py"),
    ("demo/knn_fmnist", "eval_configs/demo/knn_fmnist.py"),
    ("segmentation/upernet_vit-b_ade20k_512x512_160k", "eval_configs/segmentation/upernet_vit-b_ade20k_512x512_160k.py"),
    ("pretrain/mae_vit-b_in1k_800ep", "pretrain/configs/mae_vit-b_in1k_800ep.py"),
    ("eval_configs/knn/dino_k20.py", "eval_configs/knn/dino_k20.py"),  # a path under the source tree still works
])
def test_a_name_resolves_to_the_shipped_file(tmp_path, monkeypatch, name, rel):
    monkeypatch.chdir(tmp_path)
    assert paths.resolve_config(name) == ROOT / rel


def test_a_path_is_taken_before_a_name(tmp_path, monkeypatch):
    own = tmp_path / "linear" / "mae_vit-b_in1k"
    own.parent.mkdir()
    own.write_text("x = 1\n")
    monkeypatch.chdir(tmp_path)
    assert paths.resolve_config("linear/mae_vit-b_in1k") == Path("linear/mae_vit-b_in1k")


def test_an_unknown_name_lists_near_matches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MimbenchError) as err:
        paths.resolve_config("linear/mae_vit-b_in1")
    assert "linear/mae_vit-b_in1k" in err.value.fix and "mimbench configs" in err.value.fix
    (tmp_path / "enc.safetensors").write_bytes(b"")  # not read: the config is resolved first
    result = invoke("eval", "knn", "--encoder", str(tmp_path / "enc.safetensors"), "--config", "knn/dino_k2",
                    "--out", str(tmp_path / "knn"))
    assert result.exit_code == 2, result.output
    assert "'knn/dino_k2' is neither a config file" in result.output and "knn/dino_k20" in result.output
    result = invoke("pretrain", "--config", "pretrain/mae_tiny_fmnsit", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "pretrain/mae_tiny_fmnist" in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "knn").exists()


def test_a_users_config_inherits_a_shipped_one_by_name(tmp_path):
    mine = tmp_path / "my_linear.py"
    mine.write_text('_base_ = ["linear/mae_vit-b_in1k"]\noptim = dict(blr=0.05)\n')
    cfg = load_config(mine, kind="linear")
    shipped = load_config(paths.eval_config("linear/mae_vit-b_in1k.py"), kind="linear")
    assert cfg.optim.blr == 0.05 and shipped.optim.blr == 0.1
    assert cfg.optim.name == shipped.optim.name == "lars" and cfg.schedule.epochs == shipped.schedule.epochs


def test_an_unknown_base_name_names_the_config_and_near_matches(tmp_path):
    mine = tmp_path / "mine.py"
    mine.write_text('_base_ = ["linear/mae_vit_b_in1k"]\n')
    with pytest.raises(MimbenchError) as err:
        load_config(mine)
    assert str(mine) in err.value.problem and "'linear/mae_vit_b_in1k' (_base_)" in err.value.problem
    assert "linear/mae_vit-b_in1k" in err.value.fix


def test_configs_lists_every_shipped_config_with_its_source():
    result = invoke("configs")
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.splitlines())
    assert set(lines) == _runnable(n.removesuffix(".py") for n in _names_in_tree())
    assert lines["linear/mae_vit-b_in1k"].startswith("MAE linear probe, ViT-B on ImageNet-1k")
    assert lines["pretrain/mae_vit-b_in1k_800ep"].startswith("MAE ViT-B/16, ImageNet-1k, 800 epochs")
    assert all(summary.strip() for summary in lines.values())


@pytest.mark.parametrize("task, folder", [("linear", "linear"), ("segment", "segmentation"),
                                          ("segmentation", "segmentation"), ("pretrain", "pretrain")])
def test_configs_of_one_task(task, folder):
    result = invoke("configs", task)
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.output.splitlines()]
    assert names and all(n.startswith(folder + "/") for n in names)


def test_configs_of_an_unknown_task_lists_the_known_ones():
    result = invoke("configs", "linaer")
    assert result.exit_code == 2
    assert "No shipped configs for 'linaer'" in result.output and "linear" in result.output
