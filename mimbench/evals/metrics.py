"""Classification metrics shared by every evaluation (k-NN vote, linear probe, fine-tune, low-shot)."""
from __future__ import annotations

import torch

__all__ = ["topk_accuracy"]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Top-k accuracies in percent for each k (clamped to the number of classes).

    ``scores`` N×C (any device), ``labels`` N class indices.
    """
    out = {}
    for k in ks:
        kk = min(k, scores.shape[1])
        hit = (scores.topk(kk, dim=1).indices == labels.to(scores.device).long().view(-1, 1)).any(dim=1)
        out[k] = 100.0 * hit.float().mean().item()
    return out
