"""Weighted k-NN classification on frozen features (the DINO ``eval_knn`` protocol).

Features (the class token after the final norm, or what ``--pool`` names; see ``features``) are L2-normalised, so the dot product
is the cosine similarity. For each query the ``k`` most similar training samples vote for their
class with weight ``exp(sim / T)``; the votes are summed per class and the classes ranked by total.
Top-1 / top-5 accuracies are in percent (top-5 becomes top-C when there are fewer than 5 classes).
DINO's defaults: k=20, T=0.07 (facebookresearch/dino eval_knn.py: ``--nb_knn 20``, ``--temperature 0.07``).

Where the work runs:

* **The bank** (the normalised training features, N×D, and their labels) lives on each process's device
  (:func:`mimbench.dist.setup`), filled block by block from the feature cache's memory map, so no rank
  holds a full extra host copy. On CUDA it is float16: only the stored features are rounded (relative
  2^-11 per element, which moves a cosine by at most ~1e-3, typically ~1e-5); the similarities are
  accumulated and returned in float32 (:func:`similarity`) and the vote weights ``exp(sim / T)`` and their
  sums are float32 too. DINO keeps float32 features; a float16 bank can swap neighbours only at such
  near-ties. On CPU the bank is float32. The record's ``protocol.bank`` states its dtype and device.
* **The queries** (validation features) are split into contiguous per-rank slices
  (:func:`mimbench.batching.shard_range`); each rank votes only for its slice, :func:`query_chunk` queries
  at a time so that the chunk×N float32 similarity block stays within :data:`SIM_BLOCK_BYTES`. The top-5
  classes of every query are gathered in dataset order (:func:`mimbench.dist.gather_rows`) and the metrics
  computed from all of them; ``protocol.vote`` records the chunk and the queries each rank voted for.

k-NN memory per GPU, ImageNet-1k (N = 1,281,167 training images), float16 bank:

* bank: N × D × 2 bytes = 1.97 GB (1.83 GiB) for ViT-B (D = 768), 2.62 GB (2.44 GiB) for ViT-L (D = 1024);
  labels N × 8 bytes = 10 MB.
* similarity block: chunk × N × 4 bytes <= 1 GiB, i.e. 209 queries per chunk (1.07 GB); the top-k, the
  weights and the votes (chunk × 1000 float32) add a few MB.
* so ~3.1 GB (ViT-B) / ~3.7 GB (ViT-L) while voting. On CPU the bank is float32 (3.9 / 5.2 GB per process).
  Extracting uncached features gathers them once through the GPU (N × D float32 on every rank, twice while
  concatenating: 7.9 GB ViT-B, 10.5 GB ViT-L), freed before the bank is built.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mimbench import dist
from mimbench.batching import shard_range
from mimbench.errors import MimbenchError
from mimbench.evals import runner
from mimbench.evals.features import extract_features

__all__ = ["SIM_BLOCK_BYTES", "BANK_BLOCK_ROWS", "bank_dtype", "query_chunk", "similarity", "build_bank", "knn_vote",
           "knn_predict", "vote_sharded", "ranked_accuracy", "run_knn"]

#: Largest query-chunk × bank similarity block in bytes (1 GiB).
SIM_BLOCK_BYTES = 1 << 30
#: Training rows normalised and copied to the device at a time while the bank is built.
BANK_BLOCK_ROWS = 65536
#: Classes kept per query for the metrics (top-1 and top-5).
RANKED = 5


def bank_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA (half the memory, tensor-core similarities), float32 elsewhere."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def query_chunk(bank_rows: int, budget: int = SIM_BLOCK_BYTES) -> int:
    """Queries per chunk so that the chunk × ``bank_rows`` float32 similarity block fits ``budget`` bytes."""
    return max(1, int(budget) // (max(1, int(bank_rows)) * 4))


def similarity(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Cosine similarities Q×N in float32 of normalised ``queries`` Q×D and ``bank`` N×D of the same dtype.

    A float16 / bfloat16 bank on CUDA is multiplied with float32 accumulation and a float32 result
    (``torch.mm(..., out_dtype=torch.float32)``), so only the stored features are rounded, not the cosines.
    """
    if bank.dtype == torch.float32:
        return queries @ bank.T
    if bank.device.type == "cpu":  # no half-in, float-out product on CPUs (run_knn builds float32 banks there)
        return (queries @ bank.T).float()
    try:
        return torch.mm(queries, bank.T, out_dtype=torch.float32)
    except TypeError:  # torch releases without mm(out_dtype=): half product (fp32 accumulation in cuBLAS), then fp32
        return torch.mm(queries, bank.T).float()


def _host_rows(x, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``x`` (a tensor, an array or a read-only memory map) as a float32 tensor;
    only those rows are copied."""
    if isinstance(x, torch.Tensor):
        return x[start:stop].float()
    return torch.from_numpy(np.array(x[start:stop], dtype=np.float32))


def _labels(labels) -> torch.Tensor:
    """``labels`` (a tensor, an array or a read-only memory map) as an int64 tensor on its device or the host."""
    if isinstance(labels, torch.Tensor):
        return labels.long()
    return torch.from_numpy(np.array(labels, dtype=np.int64))


def build_bank(features, labels, *, device: torch.device | str, dtype: torch.dtype | None = None,
               block: int = BANK_BLOCK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-NN bank on ``device``: (L2-normalised ``features`` N×D in ``dtype``, ``labels`` N int64).

    ``features`` is a tensor or an array (a memory map is read ``block`` rows at a time, so the host never
    holds more than one block); ``dtype`` defaults to :func:`bank_dtype`. Normalisation runs in float32.
    """
    device = torch.device(device)
    dtype = dtype or bank_dtype(device)
    rows, dim = int(features.shape[0]), int(features.shape[1])
    bank = torch.empty(rows, dim, dtype=dtype, device=device)
    for start in range(0, rows, block):
        part = _host_rows(features, start, start + block).to(device)
        bank[start:start + part.shape[0]] = F.normalize(part, dim=1).to(dtype)
    return bank, _labels(labels).to(device)


def _check_vote(bank: torch.Tensor, queries: torch.Tensor, k: int, temperature: float) -> None:
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise MimbenchError(f"Feature shapes {tuple(bank.shape)} and {tuple(queries.shape)} "
                            "do not match (expected N×D and Q×D).", "Compute both splits with the same encoder.")
    if not 1 <= k <= bank.shape[0]:
        raise MimbenchError(f"k={k} is outside 1..{bank.shape[0]} (number of training samples).",
                            "Lower knn.k or use more training data.")
    if temperature <= 0:
        raise MimbenchError(f"Temperature {temperature} must be positive.", "Use knn.temperature > 0 (DINO: 0.07).")


@torch.no_grad()
def knn_vote(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, *, k: int,
             temperature: float, num_classes: int, chunk: int) -> torch.Tensor:
    """Class scores (Q×C float32, on ``bank.device``) of ``queries`` (Q×D, any device and dtype).

    ``bank`` N×D is L2-normalised (:func:`build_bank`); queries are normalised here in float32 and cast to
    the bank's dtype for the similarity. score[c] = sum over the k nearest neighbours of class c of
    exp(cosine / temperature), in float32. ``chunk`` queries at a time (chunk×N similarities in memory).
    """
    _check_vote(bank, queries, k, temperature)
    device = bank.device
    votes = torch.zeros(queries.shape[0], int(num_classes), dtype=torch.float32, device=device)
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start:start + chunk].to(device, torch.float32), dim=1).to(bank.dtype)
        top_sim, top_idx = similarity(q, bank).topk(k, dim=1)          # q×k of the q×N cosine similarities
        weights = (top_sim / temperature).exp()
        votes[start:start + q.shape[0]].scatter_add_(1, bank_labels[top_idx], weights)  # weight sum per class
    return votes


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor, *,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk: int = 1024) -> torch.Tensor:
    """Class scores (Q×C) of the test features (Q×D) from the training features (N×D) and labels (N):
    :func:`knn_vote` with a float32 bank on the training features' device."""
    _check_vote(train_features, test_features, k, temperature)
    num_classes = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    bank, labels = build_bank(train_features, train_labels, device=train_features.device,
                              dtype=torch.float32)
    return knn_vote(bank, labels, test_features, k=k, temperature=temperature, num_classes=num_classes,
                    chunk=chunk)


def vote_sharded(bank: torch.Tensor, bank_labels: torch.Tensor, queries, *, rank: int, world_size: int,
                 k: int, temperature: float, num_classes: int, chunk: int) -> tuple[torch.Tensor, list[int]]:
    """(top-min(5, C) classes of every query, Q×5 int64 in query order, on the bank's device; the number
    of queries each rank voted for).

    Rank ``rank`` votes only for its contiguous slice of ``queries`` (Q×D array or tensor, read as a
    slice); the slices' rankings are gathered over the processes (one process: ``world_size`` 1).
    """
    part = shard_range(len(queries), rank, world_size)
    local = _host_rows(queries, part.start, part.stop)
    scores = knn_vote(bank, bank_labels, local, k=k, temperature=temperature, num_classes=num_classes,
                      chunk=chunk)
    ranked = dist.gather_rows(scores.topk(min(RANKED, num_classes), dim=1).indices)
    counts = dist.gather_rows(torch.tensor([len(part)], dtype=torch.int64, device=bank.device))
    if ranked.shape[0] != len(queries):
        raise MimbenchError(f"Gathered k-NN votes for {ranked.shape[0]} of {len(queries)} queries.",
                            "This is a bug; please report it with the command line.")
    return ranked, [int(c) for c in counts.tolist()]


def ranked_accuracy(ranked: torch.Tensor, labels, ks=(1, 5)) -> dict[int, float]:
    """Top-k accuracies in percent from ``ranked`` (Q×R class indices, best first; k clamped to R) and
    ``labels`` (Q); the same numbers as :func:`mimbench.evals.metrics.topk_accuracy` on the scores."""
    truth = _labels(labels).to(ranked.device).view(-1, 1)
    return {k: 100.0 * (ranked[:, :min(k, ranked.shape[1])] == truth).any(dim=1).float().mean().item() for k in ks}


def run_knn(*, encoder: Path, config: Path, data: str, out: Path, overrides: list[str] = (),
            resume: bool = False, layout: str = "auto", pool: str = "auto") -> dict:
    """k-NN evaluation: features of train and val (cached), weighted vote, record written to ``out``.

    ``pool`` (``--pool``): which tokens make the feature (:func:`mimbench.evals.features.resolve_pool`; "auto":
    the class token, or the patch mean for encoders without one; EVA-02 the patch mean); the record's
    ``protocol.feature`` and ``protocol.pool`` say it.

    ``resume`` has no effect beyond the feature cache, which is always reused when it matches.
    Several processes: features are extracted sharded and gathered (``features.extract_features``), every
    rank builds the bank on its device and votes for its slice of the validation set (:func:`vote_sharded`).
    """
    run = runner.start("knn", encoder=encoder, config=config, data=data, out=out, overrides=overrides, layout=layout)
    cfg = run.cfg
    k, temperature = int(cfg.knn.k), float(cfg.knn.temperature)
    common = dict(cache_dir=Path(cfg.cache_dir or run.out / "feature_cache"), img_size=cfg.img_size,
                  batch_size=int(cfg.batch_size), num_workers=int(cfg.data.num_workers), amp=run.amp,
                  max_bad_fraction=cfg.data.max_bad_fraction, layout=layout, pool=pool, task="knn",
                  decode_draft=bool(cfg.decode_draft))
    train_x, train_y, train_info = extract_features(run.encoder, data, "train", limit=cfg.data.limit_train, **common)
    val_x, val_y, val_info = extract_features(run.encoder, data, "val", limit=cfg.data.limit_val, **common)
    bank, bank_labels = build_bank(train_x, train_y, device=run.device)
    del train_x  # the bank replaces the host features (a memory map when cached)
    chunk = query_chunk(bank.shape[0])
    ranked, per_rank = vote_sharded(bank, bank_labels, val_x, rank=run.rank, world_size=run.world_size, k=k,
                                    temperature=temperature, num_classes=len(train_info["classes"]), chunk=chunk)
    acc = ranked_accuracy(ranked, val_y)
    bank_info = {"dtype": str(bank.dtype).removeprefix("torch."), "device": bank.device.type,
                 "rows": int(bank.shape[0]), "dim": int(bank.shape[1])}
    return runner.finish(
        run,
        protocol={"k": k, "temperature": temperature, "feature": f"{train_info['feature']}, L2-normalised",
                  "pool": train_info["pool"],
                  "transform": val_info["transform"], "bank": bank_info,
                  "vote": {"query_chunk": chunk, "queries_per_rank": per_rank}},
        metrics={"top1": acc[1], "top5": acc[5]},
        dataset={"sizes": {"train": int(len(train_y)), "val": int(len(val_y))},
                 "skipped": {"train": train_info["skipped"], "val": val_info["skipped"]}})
