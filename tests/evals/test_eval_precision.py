"""Evaluations run under the resolved precision, key their feature cache by it and record it."""
import numpy as np
import pytest

from mimbench.evals import run_eval
from mimbench.evals.features import extract_features
from mimbench.fastpath import resolve_amp


def test_bf16_features_are_cached_apart_and_close_to_fp32(tiny_encoder, tmp_path, monkeypatch):
    common = dict(cache_dir=tmp_path, limit=16, batch_size=8)
    f32, _, info32 = extract_features(tiny_encoder, "builtin:fashion-mnist", "val", amp="none", **common)
    monkeypatch.setenv("MIMBENCH_CPU_BF16", "1")
    f16, _, info16 = extract_features(tiny_encoder, "builtin:fashion-mnist", "val", amp="auto", **common)
    assert (info32["precision"], info16["precision"]) == ("none", "bf16")
    assert info16["key"] != info32["key"] and not info16["cached"]
    assert f16.dtype == np.float32 and not np.array_equal(f16, f32)
    cos = (f16 * f32).sum(1) / np.linalg.norm(f16, axis=1) / np.linalg.norm(f32, axis=1)
    assert cos.min() > 0.99


@pytest.mark.parametrize("forced", ["0", "1"])
def test_knn_record_says_which_precision_was_used(tiny_encoder, tmp_path, monkeypatch, forced):
    monkeypatch.setenv("MIMBENCH_CPU_BF16", forced)
    record = run_eval("knn", encoder=tiny_encoder, config="eval_configs/knn/dino_k20.py", data="builtin:fashion-mnist",
                      out=tmp_path, overrides=["data.limit_train=64", "data.limit_val=32", "knn.k=5"])
    assert record["hardware"]["precision"] == resolve_amp("auto", "cpu") == ("bf16" if forced == "1" else "none")
