"""Per-layer k-NN and linear accuracy from one feature pass.

The features are the linear probe's ``--layers all`` readout (:func:`mimbench.evals.features.extract_features`
with ``layers="all"``: every block's pooled tokens after the final norm, from one forward pass per batch,
cached on disk). Each block's part of the rows is then scored by:

- the weighted k-NN vote of :func:`mimbench.evals.knn.knn_predict` (DINO's k = 20, T = 0.07), and
- one linear head per block trained side by side on the cached training features
  (:func:`mimbench.evals.linear.build_head` with ``blocks``: BatchNorm without affine + Linear per block, the
  summed per-block cross-entropies of :func:`mimbench.evals.linear.probe_loss`), Adam with the analysis' own
  small budget (:data:`LINEAR_BUDGET`) - a quick probe for comparing layers and encoders, not the MAE protocol.
"""
from __future__ import annotations

import numpy as np
import torch

from mimbench.evals.features import Readout
from mimbench.evals.knn import knn_predict
from mimbench.evals.linear import block_metrics, build_head, build_optimizer, probe_loss
from mimbench.evals.metrics import topk_accuracy

#: DINO's k-NN settings (facebookresearch/dino eval_knn.py ``--nb_knn 20 --temperature 0.07``).
KNN_K, KNN_T = 20, 0.07
#: The per-block linear heads' budget on cached features: Adam, lr 1e-3, no weight decay, batch 256, 20 epochs.
LINEAR_BUDGET = {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.999), "batch_size": 256,
                 "epochs": 20}


def split_blocks(features, depth: int) -> list[np.ndarray]:
    """The rows of a ``layers="all"`` feature matrix (N × depth·F, block 0 first) as one N×F array per block."""
    rows = np.asarray(features, dtype=np.float32)
    return list(rows.reshape(rows.shape[0], depth, -1).transpose(1, 0, 2))


def knn_per_block(train: list[np.ndarray], train_y, val: list[np.ndarray], val_y, num_classes: int,
                  k: int = KNN_K, temperature: float = KNN_T) -> dict[str, float]:
    """Block -> k-NN top-1 (%) of each block's features."""
    ty, vy = torch.as_tensor(np.asarray(train_y)), torch.as_tensor(np.asarray(val_y))
    k = min(int(k), len(ty))
    return {str(b): topk_accuracy(knn_predict(torch.from_numpy(tx), ty, torch.from_numpy(vx), k=k,
                                              temperature=temperature, num_classes=num_classes), vy, ks=(1,))[1]
            for b, (tx, vx) in enumerate(zip(train, val))}


def linear_per_block(train_x, train_y, val_x, val_y, depth: int, num_classes: int, seed: int,
                     budget: dict = LINEAR_BUDGET) -> dict[str, float]:
    """Block -> linear top-1 (%) of one head per block trained together on the ``layers="all"`` rows."""
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    x, y = torch.from_numpy(np.asarray(train_x, dtype=np.float32)), torch.as_tensor(np.asarray(train_y)).long()
    head = build_head(x.shape[1] // depth, num_classes, blocks=depth)
    optimizer = build_optimizer(head, budget, float(budget["lr"]))
    head.train()
    for _ in range(int(budget["epochs"])):
        for idx in torch.randperm(len(x), generator=gen).split(int(budget["batch_size"])):
            if len(idx) < 2:  # a batch-norm batch needs two rows
                continue
            optimizer.zero_grad(set_to_none=True)
            probe_loss(head, None, x[idx], y[idx]).backward()
            optimizer.step()
            head[0].commit()
    head.eval()
    with torch.no_grad():
        logits = head(torch.from_numpy(np.asarray(val_x, dtype=np.float32)))
    spec = Readout("all", "all", tuple(range(depth)), "cls", depth)
    per_block = block_metrics(logits, torch.as_tensor(np.asarray(val_y)).long(), spec)["per_block"]
    return {b: m["top1"] for b, m in per_block.items()}


__all__ = ["KNN_K", "KNN_T", "LINEAR_BUDGET", "knn_per_block", "linear_per_block", "split_blocks"]
