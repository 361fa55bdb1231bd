"""``mimbench analyze``: what a pre-training technique did to the representation, as one record and figures.

For encoder ``ENCODER`` on ``--data`` (its ``val`` split for the subset, ``train`` + ``val`` for the probes):

- a fixed subset of ``samples`` validation images (default 1,000), drawn without replacement with
  ``numpy.random.default_rng(seed)`` and sorted (:func:`subset_indices`), the same for every encoder given the
  same data, size and seed; the record stores the seed, the size and the subset's sha256;
- on the subset: mean attention distance and attention entropy per block and head
  (:mod:`mimbench.analysis.attention`; skipped with the reason for an encoder whose attention cannot be read),
  every block's pooled feature (the ``--layers all`` readout of :mod:`mimbench.evals.features`), their linear CKA
  between blocks (heat map) and RankMe per block (:mod:`mimbench.analysis.measures`); with ``compare`` the CKA
  between every block of the two encoders, whatever their depths;
- per-block k-NN and linear accuracy from one cached feature pass over train and val
  (:mod:`mimbench.analysis.probes`);
- with ``pretrain_run`` (a pre-training folder of the MAE family): loss by distance to the nearest visible
  patch and the target-normalisation statistics (:mod:`mimbench.analysis.pretraining`).

Everything runs in float32 (no autocast), so the attention numbers are those of the encoder's weights.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from mimbench import dist, encoders
from mimbench.analysis import figures
from mimbench.analysis.attention import AttentionUnreadable, attention_measures
from mimbench.analysis.measures import cka_matrix, rankme
from mimbench.analysis.pretraining import pretrain_measures
from mimbench.analysis.probes import KNN_K, KNN_T, LINEAR_BUDGET, knn_per_block, linear_per_block, split_blocks
from mimbench.data import build_dataset
from mimbench.errors import MimbenchError
from mimbench.evals.features import eval_transform, extract_features, read_features, readout
from mimbench.evals.runner import dataset_root
from mimbench.results.records import encoder_summary, new_record, write_record

TASK = "analyze"
#: Default subset size (images of the val split) and seed.
SAMPLES, SEED = 1000, 0
#: Images per forward pass on the subset.
BATCH = 64


def subset_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """The sorted indices of ``min(samples, n)`` of ``n`` images drawn without replacement with
    ``numpy.random.default_rng(seed)`` (all of them, in order, when ``samples >= n``)."""
    if samples <= 0:
        raise MimbenchError(f"samples = {samples} must be positive.", "Use --samples 1 or more (default 1000).")
    if samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(int(seed)).choice(n, size=int(samples), replace=False))


def subset_images(data: str, img_size: int, indices: np.ndarray) -> torch.Tensor:
    """The preprocessed val images at ``indices`` (N×C×S×S), as the evaluations preprocess them."""
    transform, _ = eval_transform(data, img_size)
    dataset = build_dataset(data, "val", transform=transform, img_size=img_size)
    return torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in indices])


def _val_size(data: str) -> int:
    return len(build_dataset(data, "val", transform=eval_transform(data, 32)[0], img_size=32))


def block_features(encoder: Path, images: torch.Tensor, device, layout: str = "auto") -> list[np.ndarray]:
    """One pooled feature matrix (N×F) per block of ``encoder`` on ``images`` (the ``--layers all`` readout)."""
    model = encoders.load_encoder(encoder, img_size=images.shape[-1], layout=layout).to(device).eval()
    spec = readout(encoder, "all", "auto", layout=layout, task="knn")
    rows = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], BATCH):
            rows.append(read_features(model, images[start:start + BATCH].to(device), spec).float().cpu())
    return split_blocks(torch.cat(rows).numpy(), spec.depth)


def _attention(model, images: torch.Tensor, skipped: dict) -> dict:
    try:
        measured = attention_measures(model, images, BATCH)
    except AttentionUnreadable as err:
        skipped["attention_distance"] = skipped["attention_entropy"] = err.problem
        return {}
    dist_, ent = measured["distance"], measured["entropy"]
    return {"attention_distance": dist_.tolist(), "attention_distance_mean": dist_.mean(dim=1).tolist(),
            "attention_entropy": ent.tolist(), "attention_entropy_mean": ent.mean(dim=1).tolist()}


def _probes(encoder: Path, data: str, *, out: Path, limits: tuple, seed: int, device, layout: str,
            img_size: int) -> dict:
    common = dict(cache_dir=out / "feature_cache", img_size=img_size, batch_size=BATCH, device=device, amp="none",
                  layout=layout, layers="all", pool="auto", task="knn")
    tx, ty, tinfo = extract_features(encoder, data, "train", limit=limits[0], **common)
    vx, vy, _ = extract_features(encoder, data, "val", limit=limits[1], **common)
    depth = int(tinfo["readout"]["blocks"][-1]) + 1
    classes = len(tinfo["classes"])
    train, val = split_blocks(tx, depth), split_blocks(vx, depth)
    return {"knn_top1_per_block": knn_per_block(train, ty, val, vy, classes),
            "linear_top1_per_block": linear_per_block(tx, ty, vx, vy, depth, classes, seed),
            "probe_sizes": {"train": int(len(ty)), "val": int(len(vy))}}


def _compare(other: Path, data: str, indices: np.ndarray, mine: list, device, layout: str) -> dict:
    size = int(encoders.read_metadata(other)["img_size"])
    theirs = block_features(other, subset_images(data, size, indices), device)
    return {"cka_compare": cka_matrix(mine, theirs).tolist(), "compare_depths": [len(mine), len(theirs)]}


def analysis_settings(samples: int, seed: int, limits: tuple, compare, pretrain_run) -> dict:
    return {"samples": int(samples), "seed": int(seed), "limit_train": limits[0], "limit_val": limits[1],
            "knn": {"k": KNN_K, "temperature": KNN_T}, "linear": {k: (list(v) if isinstance(v, tuple) else v)
                                                                  for k, v in LINEAR_BUDGET.items()},
            "compare": None if compare is None else encoders.encoder_sha256(compare),
            "pretrain_run": None if pretrain_run is None else str(Path(pretrain_run).resolve()),
            "precision": "none (float32)"}


def settings_sha256(settings: dict) -> str:
    """The record's ``protocol.sha256``: of the analysis settings (what a re-run must match to be reused)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _pretraining(run_dir, data: str, indices: np.ndarray, seed: int, skipped: dict) -> dict:
    if run_dir is None:
        return {}
    try:
        return {"pretrain": pretrain_measures(Path(run_dir), lambda size: subset_images(data, size, indices), seed)}
    except MimbenchError as err:
        skipped["pretrain"] = err.problem
        return {}


def write_figures(metrics: dict, out: Path, name: str, compare_name: str | None = None) -> list[Path]:
    """The figures of one analysis record's ``metrics`` into ``out``; returns their paths."""
    written = []
    if "attention_distance" in metrics:
        written.append(figures.plot_per_head(metrics["attention_distance"], out / "attention_distance.png",
                                             ylabel="mean attention distance (pixels)", title=f"{name}: attention distance"))
        written.append(figures.plot_per_head(metrics["attention_entropy"], out / "attention_entropy.png",
                                             ylabel="attention entropy (nats)", title=f"{name}: attention entropy"))
    if "knn_top1_per_block" in metrics:
        curves = {"k-NN": list(metrics["knn_top1_per_block"].values()),
                  "linear": list(metrics["linear_top1_per_block"].values())}
        written.append(figures.plot_layer_curves(curves, out / "probes_by_layer.png", ylabel="top-1 accuracy (%)",
                                                 title=f"{name}: probes by layer"))
    written.append(figures.plot_layer_curves({"RankMe": metrics["rankme"]}, out / "rankme.png",
                                             ylabel="RankMe (effective rank)", title=f"{name}: RankMe by layer"))
    written.append(figures.plot_cka(metrics["cka_self"], out / "cka_self.png", rows=name, cols=name,
                                    title=f"{name}: CKA between its layers"))
    if "cka_compare" in metrics:
        written.append(figures.plot_cka(metrics["cka_compare"], out / "cka_compare.png", rows=name,
                                        cols=compare_name or "other", title="CKA between the two encoders"))
    if "pretrain" in metrics:
        written.append(figures.plot_loss_by_distance(metrics["pretrain"]["loss_by_distance"],
                                                     out / "loss_by_distance.png",
                                                     title=f"{name}: masked-patch loss by distance"))
    return written


def _measure(encoder: Path, data: str, *, out: Path, indices, settings: dict, compare, pretrain_run, device,
             layout: str, skipped: dict) -> dict:
    """Every measure of the analysis into one metrics dict (skipped ones named in ``skipped``)."""
    size = int(encoders.read_metadata(encoder, layout=layout)["img_size"])
    images = subset_images(data, size, indices)
    model = encoders.load_encoder(encoder, img_size=size, layout=layout).to(device).eval()
    metrics = _attention(model, images, skipped)
    del model
    layers = block_features(encoder, images, device, layout)
    metrics["rankme"] = [rankme(f) for f in layers]
    metrics["cka_self"] = cka_matrix(layers, layers).tolist()
    metrics.update(_probes(encoder, data, out=out, limits=(settings["limit_train"], settings["limit_val"]),
                           seed=settings["seed"], device=device, layout=layout, img_size=size))
    if compare is not None:
        metrics.update(_compare(Path(compare), data, indices, layers, device, layout))
    metrics.update(_pretraining(pretrain_run, data, indices, settings["seed"], skipped))
    return metrics


def run_analyze(encoder: Path, *, data: str, out: Path, compare: Path | None = None, pretrain_run: Path | None = None,
                samples: int = SAMPLES, seed: int = SEED, limit_train: int | None = None, limit_val: int | None = None,
                layout: str = "auto") -> dict:
    """Analyse ``encoder`` on ``data`` (see the module docstring); writes the record (task ``analyze``) and the
    figures into ``out`` and returns the record. Inputs are checked before any work starts."""
    started = time.time()
    encoder, out = Path(encoder), Path(out)
    encoders.check_encoder_file(encoder)
    if compare is not None:
        encoders.check_encoder_file(Path(compare))
    if pretrain_run is not None and not (Path(pretrain_run) / "config.py").is_file():
        raise MimbenchError(f"--pretrain-run {pretrain_run} holds no config.py: it is not a pre-training folder.",
                            "Give the --out folder of `mimbench pretrain`.")
    indices = subset_indices(_val_size(data), samples, seed)
    limits = (limit_train, limit_val)
    settings = analysis_settings(samples, seed, limits, compare, pretrain_run)
    out.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    device = dist.setup().device
    torch.manual_seed(int(seed))
    metrics = _measure(encoder, data, out=out, indices=indices, settings=settings, compare=compare,
                       pretrain_run=pretrain_run, device=device, layout=layout, skipped=skipped)
    subset = {"seed": int(seed), "size": int(len(indices)), "split": "val",
              "sha256": hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()}
    protocol = {"name": TASK, "sha256": settings_sha256(settings), "deviations": [], "settings": settings,
                "subset": subset, "skipped": skipped,
                **({} if compare is None else {"compare": encoder_summary(Path(compare))})}
    record = new_record(TASK, protocol=protocol, encoder=encoder_summary(encoder, layout=layout),
                        dataset={"name": data, "root": dataset_root(data),
                                 "sizes": {"subset": len(indices), **metrics.pop("probe_sizes")}},
                        metrics=metrics, seed=int(seed), started=started, finished=time.time(), precision="none")
    write_record(out, record)
    write_figures(metrics, out, encoder.parent.name if encoder.stem == "encoder" else encoder.stem,
                  None if compare is None else Path(compare).stem)
    return record


__all__ = ["SAMPLES", "SEED", "TASK", "analysis_settings", "block_features", "run_analyze", "settings_sha256",
           "subset_indices", "subset_images", "write_figures"]
