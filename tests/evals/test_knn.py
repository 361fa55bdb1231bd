import json

import numpy as np
import pytest
import torch

from mimbench.errors import MimbenchError
from mimbench.evals import run_eval
from mimbench.evals.features import extract_features
from mimbench.evals.knn import (bank_dtype, build_bank, knn_predict, knn_vote, query_chunk, ranked_accuracy,
                                similarity, vote_sharded)
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
    assert record["protocol"]["bank"] == {"dtype": "float32", "device": "cpu", "rows": 200, "dim": 32}
    assert record["protocol"]["vote"] == {"query_chunk": query_chunk(200), "queries_per_rank": [50]}
    written = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert [r["run_id"] for r in written] == [record["run_id"]]


def test_unknown_task():
    with pytest.raises(MimbenchError, match="Unknown evaluation task"):
        run_eval("nope", encoder="x", config="y", data="z", out="o")


def _clustered(n_train=300, n_query=60, dim=16, classes=7, seed=0):
    """Features scattered around one random centre per class (norms 0.5..3, so normalisation matters)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    train_y = torch.randint(0, classes, (n_train,), generator=g)
    query_y = torch.randint(0, classes, (n_query,), generator=g)
    scale = lambda n: 0.5 + 2.5 * torch.rand(n, 1, generator=g)  # noqa: E731
    train = (centres[train_y] + 0.8 * torch.randn(n_train, dim, generator=g)) * scale(n_train)
    query = (centres[query_y] + 0.8 * torch.randn(n_query, dim, generator=g)) * scale(n_query)
    return train, train_y, query, query_y


def _same_vote(scores, reference):
    """Equal up to the BLAS blocking of the similarity product (which changes with the number of query rows
    and so sums in another order, ~1e-6 relative), with the same ranking of the classes."""
    torch.testing.assert_close(scores, reference, rtol=1e-5, atol=0)
    assert torch.equal(scores.topk(5, dim=1).indices, reference.topk(5, dim=1).indices)


def test_chunked_vote_equals_unchunked():
    train, train_y, query, _ = _clustered()
    bank, labels = build_bank(train, train_y, device="cpu")
    whole = knn_vote(bank, labels, query, k=10, temperature=0.07, num_classes=7, chunk=len(query))
    for chunk in (1, 7, 59):
        _same_vote(knn_vote(bank, labels, query, k=10, temperature=0.07, num_classes=7, chunk=chunk), whole)
    # and the slices the ranks of a 3-process run would vote for, put together, are the whole
    parts = [knn_vote(bank, labels, query[a:b], k=10, temperature=0.07, num_classes=7, chunk=8)
             for a, b in ((0, 20), (20, 40), (40, 60))]
    _same_vote(torch.cat(parts), whole)
    _same_vote(knn_predict(train, train_y, query, k=10, temperature=0.07, num_classes=7), whole)


def test_vote_creates_every_tensor_on_the_bank_device():
    # a bank on the meta device: any tensor the vote made on another device would make it fail
    train, train_y, query, _ = _clustered()
    bank, labels = build_bank(train, train_y, device="meta", dtype=torch.float16)
    assert bank.device.type == labels.device.type == "meta" and bank.dtype == torch.float16
    scores = knn_vote(bank, labels, query, k=5, temperature=0.07, num_classes=7, chunk=16)
    assert scores.device.type == "meta" and scores.shape == (60, 7) and scores.dtype == torch.float32
    # a half bank off the CPU (the CUDA path) gives float32 similarities: the cosines are not rounded to half
    sim = similarity(query[:4].to("meta", torch.float16), bank)
    assert sim.dtype == torch.float32 and sim.shape == (4, 300) and sim.device.type == "meta"


def test_bank_is_built_blockwise_from_a_memory_map(tmp_path):
    train, train_y, _, _ = _clustered()
    np.save(tmp_path / "f.npy", train.numpy())
    np.save(tmp_path / "y.npy", train_y.numpy())
    feats, ys = np.load(tmp_path / "f.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r")
    bank, labels = build_bank(feats, ys, device="cpu", block=7)
    assert bank.dtype == torch.float32 and torch.equal(labels, train_y)
    torch.testing.assert_close(bank, torch.nn.functional.normalize(train, dim=1), rtol=0, atol=0)


def test_fp16_bank_ranks_like_fp32_and_votes_in_fp32():
    # exp(cos / 0.07) reaches exp(14.3) = 1.6e6, beyond float16's 65504: weights and sums must be float32
    train, train_y, query, query_y = _clustered(classes=5)
    near = torch.cat([query[:3], train[:2] * 4.0])  # two queries on a training point: cosine 1
    args = dict(k=10, temperature=0.07, num_classes=5, chunk=16)
    full = knn_vote(*build_bank(train, train_y, device="cpu", dtype=torch.float32), near, **args)
    half = knn_vote(*build_bank(train, train_y, device="cpu", dtype=torch.float16), near, **args)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, full, rtol=2e-2, atol=1e-3)
    assert torch.equal(half.argmax(1), full.argmax(1))


def test_bank_dtype_and_chunk_follow_the_device_and_memory_budget():
    assert bank_dtype(torch.device("cuda", 3)) == torch.float16 and bank_dtype(torch.device("cpu")) == torch.float32
    imagenet = 1_281_167  # the numbers stated in the module docstring and README's k-NN memory section
    assert query_chunk(imagenet) == 209 and query_chunk(10, budget=400) == 10 and query_chunk(10**12) == 1


def test_ranked_accuracy_equals_topk_accuracy_on_the_scores():
    g = torch.Generator().manual_seed(1)
    for classes in (3, 10):
        scores, labels = torch.rand(200, classes, generator=g), torch.randint(0, classes, (200,), generator=g)
        ranked = scores.topk(min(5, classes), dim=1).indices
        assert ranked_accuracy(ranked, labels.numpy()) == topk_accuracy(scores, labels, ks=(1, 5))


def test_one_process_vote_covers_every_query():
    train, train_y, query, query_y = _clustered()
    bank, labels = build_bank(train, train_y, device="cpu")
    ranked, per_rank = vote_sharded(bank, labels, query.numpy(), rank=0, world_size=1, k=10, temperature=0.07,
                                    num_classes=7, chunk=16)
    scores = knn_vote(bank, labels, query, k=10, temperature=0.07, num_classes=7, chunk=16)
    assert per_rank == [60] and torch.equal(ranked, scores.topk(5, dim=1).indices)
    # a rank that voted for half of the queries only cannot pass for the whole set
    with pytest.raises(MimbenchError, match="30 of 60 queries"):
        vote_sharded(bank, labels, query, rank=0, world_size=2, k=10, temperature=0.07, num_classes=7, chunk=16)
