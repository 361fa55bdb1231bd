"""Weighted k-NN classification on frozen features (the DINO ``eval_knn`` protocol).

Features (class token after the final norm, see ``features``) are L2-normalised, so the dot product
is the cosine similarity. For each query the ``k`` most similar training samples vote for their
class with weight ``exp(sim / T)``; the votes are summed per class and the classes ranked by total.
Top-1 / top-5 accuracies are in percent (top-5 becomes top-C when there are fewer than 5 classes).
DINO's defaults: k=20, T=0.07 (facebookresearch/dino eval_knn.py: ``--nb_knn 20``, ``--temperature 0.07``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mimbench.errors import MimbenchError
from mimbench.evals.metrics import topk_accuracy


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, *,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk: int = 1024) -> torch.Tensor:
    """Class scores (Q×C) of the test features (Q×D) from the training features (N×D) and labels (N).

    Features are L2-normalised here; score[c] = sum over the k nearest neighbours of class c of
    exp(cosine / temperature). ``chunk`` queries are processed at a time to bound memory (chunk×N).
    """
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise MimbenchError(f"Feature shapes {tuple(train_features.shape)} and {tuple(test_features.shape)} "
                            "do not match (expected N×D and Q×D).", "Compute both splits with the same encoder.")
    if not 1 <= k <= train_features.shape[0]:
        raise MimbenchError(f"k={k} is outside 1..{train_features.shape[0]} (number of training samples).",
                            "Lower knn.k or use more training data.")
    if temperature <= 0:
        raise MimbenchError(f"Temperature {temperature} must be positive.", "Use knn.temperature > 0 (DINO: 0.07).")
    num_classes = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    labels = train_labels.long()
    scores = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start:start + chunk] @ train.T                      # q×N cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)                          # q×k
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, labels[top_idx], weights)                # sum of weights per class
        scores.append(votes)
    return torch.cat(scores)


def run_knn(*, encoder: Path, config: Path, data: str, out: Path, overrides: list[str] = (),
            resume: bool = False, layout: str = "auto") -> dict:
    """k-NN evaluation: features of train and val (cached), weighted vote, record written to ``out``.

    ``resume`` has no effect beyond the feature cache, which is always reused when it matches.
    Several processes: features are extracted sharded and gathered (``features.extract_features``);
    the vote then runs on the gathered features on every rank, so the metrics are those of one process.
    """
    from mimbench.evals import runner
    from mimbench.evals.features import extract_features

    run = runner.start("knn", encoder=encoder, config=config, data=data, out=out, overrides=overrides, layout=layout)
    cfg = run.cfg
    knn = cfg.get("knn", {})
    k, temperature = int(knn.get("k", 20)), float(knn.get("temperature", 0.07))
    data_cfg = cfg.get("data", {})
    cache_dir = Path(cfg.get("cache_dir") or run.out / "feature_cache")
    common = dict(cache_dir=cache_dir, img_size=cfg.get("img_size"), batch_size=int(cfg.get("batch_size", 256)),
                  num_workers=int(cfg.get("num_workers", 0)), amp=run.amp,
                  max_bad_fraction=runner.max_bad_fraction(run), layout=layout)
    train_x, train_y, train_info = extract_features(run.encoder, data, "train", limit=data_cfg.get("limit_train"),
                                                    **common)
    val_x, val_y, val_info = extract_features(run.encoder, data, "val", limit=data_cfg.get("limit_val"), **common)
    scores = knn_predict(torch.from_numpy(np.asarray(train_x)), torch.from_numpy(np.asarray(train_y)),
                         torch.from_numpy(np.asarray(val_x)), k=k, temperature=temperature,
                         num_classes=len(train_info["classes"]))
    acc = topk_accuracy(scores, torch.from_numpy(np.asarray(val_y)))
    return runner.finish(
        run,
        protocol={"k": k, "temperature": temperature, "feature": "class token after final norm, L2-normalised",
                  "transform": val_info["transform"]},
        metrics={"top1": acc[1], "top5": acc[5]},
        dataset={"sizes": {"train": int(len(train_y)), "val": int(len(val_y))},
                 "skipped": {"train": train_info["skipped"], "val": val_info["skipped"]}})
