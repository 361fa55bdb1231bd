import json

import numpy as np
import pytest
import torch

from mimbench.errors import MimbenchError
from mimbench.evals import run_eval
from mimbench.evals.features import extract_features
from mimbench.evals.knn import knn_predict
from mimbench.evals.metrics import topk_accuracy


def test_knn_vote_matches_hand_computation():
    # training points on the unit circle; query at angle 0 sees classes by cosine similarity
    angles = torch.tensor([0.0, 0.1, 0.2, 3.0, 3.1, 1.5])
    train = torch.stack([angles.cos(), angles.sin()], 1) * torch.tensor([[2.0], [1.0], [5.0], [1.0], [3.0], [1.0]])
    labels = torch.tensor([0, 1, 1, 2, 2, 3])
    query = torch.tensor([[1.0, 0.0], [-1.0, 0.05]])
    scores = knn_predict(train, labels, query, k=3, temperature=0.5, num_classes=4)
    # query 0: neighbours angles 0 (cls 0), 0.1 (cls 1), 0.2 (cls 1) -- norms must not matter
    s = torch.tensor([0.0, 0.1, 0.2]).cos()
    expected0 = torch.tensor([(s[0] / 0.5).exp(), (s[1] / 0.5).exp() + (s[2] / 0.5).exp(), 0.0, 0.0])
    assert torch.allclose(scores[0], expected0, rtol=1e-5)
    assert scores[1].argmax() == 2  # near angle pi: class 2
    acc = topk_accuracy(scores, torch.tensor([1, 2]), ks=(1, 5))
    assert acc == {1: 100.0, 5: 100.0}
    assert topk_accuracy(scores, torch.tensor([0, 0]), ks=(1,))[1] == 0.0
    with pytest.raises(MimbenchError, match="k=7"):
        knn_predict(train, labels, query, k=7)


def test_features_cached_and_reused(tiny_encoder, tmp_path):
    f1, y1, info1 = extract_features(tiny_encoder, "builtin:fashion-mnist", "val", cache_dir=tmp_path, limit=24,
                                     batch_size=8)
    assert not info1["cached"] and f1.shape == (24, 32) and y1.shape == (24,)
    f2, y2, info2 = extract_features(tiny_encoder, "builtin:fashion-mnist", "val", cache_dir=tmp_path, limit=24)
    assert info2["cached"] and info2["key"] == info1["key"]
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(y1, y2)
    # the feature is the class token after the final norm
    from mimbench.data import build_dataset
    from mimbench.encoders import load_encoder

    x = torch.stack([build_dataset("builtin:fashion-mnist", "val")[i][0] for i in range(2)])
    with torch.no_grad():
        ref = load_encoder(tiny_encoder)(x)  # timm: global_pool="token" -> normed class token
    np.testing.assert_allclose(f1[:2], ref.numpy(), rtol=1e-5, atol=1e-5)
    # another split or limit is another entry
    _, _, info3 = extract_features(tiny_encoder, "builtin:fashion-mnist", "val", cache_dir=tmp_path, limit=16)
    assert not info3["cached"] and info3["key"] != info1["key"]


def test_run_knn_writes_record(tiny_encoder, tmp_path):
    record = run_eval("knn", encoder=tiny_encoder, config="eval_configs/demo/knn_fmnist.py",
                      data="builtin:fashion-mnist", out=tmp_path,
                      overrides=["data.limit_train=200", "data.limit_val=50"], resume=False)
    assert record["task"] == "knn" and record["protocol"]["k"] == 20 and record["protocol"]["temperature"] == 0.07
    assert 0.0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 100.0
    assert record["dataset"]["sizes"] == {"train": 200, "val": 50}
    written = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert [r["run_id"] for r in written] == [record["run_id"]]


def test_unknown_task():
    with pytest.raises(MimbenchError, match="Unknown evaluation task"):
        run_eval("nope", encoder="x", config="y", data="z", out="o")
