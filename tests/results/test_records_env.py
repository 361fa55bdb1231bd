"""Environment information for run records: complete when possible, never failing."""
from __future__ import annotations

import platform

from mimbench import env


def test_versions_and_hardware():
    info = env.environment_info()
    v = info["versions"]
    assert v["python"] == platform.python_version()
    import timm
    import torch

    assert v["torch"] == torch.__version__.split("+")[0] and v["timm"] == timm.__version__
    assert v["mimbench"]
    assert info["hardware"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert info["hardware"]["count"] >= 1


def test_reexported_where_records_live():
    from mimbench.results import records

    assert records.environment_info is env.environment_info


def test_world_size_counts_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert env.hardware_info()["count"] == 8


def test_no_git_binary_is_not_an_error(monkeypatch):
    env._git_state.cache_clear()
    monkeypatch.setenv("PATH", "")
    try:
        info = env.environment_info()
        assert info["versions"]["git_commit"] is None and info["versions"]["git_dirty"] is None
    finally:
        env._git_state.cache_clear()


def test_commit_reported_only_for_own_checkout(monkeypatch, tmp_path):
    env._git_state.cache_clear()
    calls = []

    def fake_git(args, cwd):
        calls.append(args)
        return str(tmp_path) if args[0] == "rev-parse" and "--show-toplevel" in args else "f" * 40

    monkeypatch.setattr(env, "_git", fake_git)
    try:
        assert env.git_commit() is None  # toplevel is some other repository
        assert calls == [["rev-parse", "--show-toplevel"]]
    finally:
        env._git_state.cache_clear()
