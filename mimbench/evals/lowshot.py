"""Low-shot classification: MSN's logistic regression on frozen features of a few labelled training images.

The training subset (``lowshot`` section of the config, or ``--split-file`` / ``--shots`` / ``--seeds``):

* **split files** (``lowshot.split_files``), one run each, in the SimCLR / MSN format: one training image
  per line, its class the folder that holds it. A bare file name (``n04235860_14959.JPEG``, as in SimCLR's
  ``1percent.txt`` / ``10percent.txt`` and MSN's ``imagenet_subsets{1,2,3}/{1,2,5}imgs_class.txt``) is
  looked up by name in ``train/``; a line with a folder (``n04235860/n04235860_14959.JPEG``) by its path
  below ``train/``. Blank lines are ignored. The images per class are counted from the file's lines, never
  read from its name: MSN's split-3 five-shot file is named ``3imgs_class.txt`` but lists 5 images per
  class, and is recorded as such. For the built-in Fashion-MNIST subset a "file name" is the 0-based index
  of the image in its ``train`` split (``0`` .. ``11999``), and its class is that image's label.
* **shots** (``lowshot.shots`` = K, ``lowshot.seeds`` = N, default 3): K images per class drawn without
  replacement, once per seed ``runtime.seed + i`` (``i`` < N), by :func:`shot_indices`.

Refused before any feature is computed: a split file naming images the training split does not have (the
first few and their count), a duplicate line, a class with no image after subsampling, K above the smallest
class, fewer than 3 classes (cyanure turns a 2-class problem into binary logistic regression, another
objective). With ``data.limit_train`` the images are drawn from (and a split file must name) the first
``limit_train`` training images.

Features: the class token after the encoder's final norm (:func:`mimbench.evals.features.extract_features`:
the same cache as k-NN and the cached linear probe; all training images are extracted once, then the subsets
are read from it). MSN takes the class token before the final LayerNorm; the feature extractor offers only
the normed token, which the record states. Pre-processing: Resize 256 → CenterCrop 224 (at 224) for train
and val, no augmentation, as MSN.

Classifier (facebookresearch/msn ``logistic_eval.py``): each feature is centred (its mean over its D
values subtracted) then L2-normalised (:func:`centre_normalise`, train and val alike); cyanure's
multiclass logistic regression without intercept minimises (:func:`logreg_objective`)

    (1/N) * sum_i [ log sum_c exp(w_c . x_i) - w_{y_i} . x_i ]  +  (lambda_1 / 2) * ||W||_F^2,

with ``lambda_1 = classifier.lambd / N`` (MSN: ``lambd = 0.00025``, divided by the number of training
samples), ``tol`` 1e-3 (relative duality gap) and at most ``max_iter`` 300 epochs. cyanure is the optional
extra ``lowshot`` (``pip install 'mimbench[lowshot]'``).

Records: one per run in ``<out>/runs/`` (``protocol.subset``: the split file's name, path and sha256, or
the shots and the seed; the number of images, the images per class and ``images_sha256``, the sha256 of the
images used written as a split file in pool order; metrics top1 / top5 / train_top1), and the
summary in ``<out>/``: ``metrics.top1`` / ``top5`` are the means over the runs, ``top1_std`` /
``top5_std`` the sample standard deviations (ddof 1; None for a single run), ``runs`` their number, and
``protocol.runs`` lists each run's subset, accuracies and record file. The summary is the record returned.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from mimbench.config import format_override
from mimbench.data import FASHION_MNIST_CLASSES, check_imagefolder, is_builtin
from mimbench.data.builtin import subset_arrays
from mimbench.errors import MimbenchError
from mimbench.evals import runner
from mimbench.evals.features import extract_features

#: What the records say about the features (MSN's classifier values are the schema's defaults, mimbench.schema).
FEATURE = "class token after the final norm, centred then L2-normalised per sample"
FEATURE_DEVIATION = "feature: class token after the final norm (MSN: before it)"
EXTRA_FIX = "Install the optional extra: pip install 'mimbench[lowshot]' (cyanure>=1.2.2,<2)."
#: Missing names listed in an error (the count is always given).
SHOW_MISSING = 5
RUNS_DIR = "runs"


@dataclass(frozen=True)
class Pool:
    """The training images a subset is drawn from, in feature-row order: a name per image (``class/file``
    below ``train/`` for folders, the index for the built-in data) and its label."""

    names: list[str]
    labels: np.ndarray
    classes: list[str]

    def limited(self, limit: int | None) -> "Pool":
        if limit is None or limit >= len(self.names):
            return self
        return Pool(self.names[:limit], self.labels[:limit], self.classes)

    def without(self, files: set[str]) -> "Pool":
        keep = [i for i, n in enumerate(self.names) if n not in files]
        return Pool([self.names[i] for i in keep], self.labels[keep], self.classes)


@dataclass(frozen=True)
class Subset:
    """One run's training images: rows of the pool, and what the record says about where they come from."""

    indices: np.ndarray
    seed: int
    source: dict  # {"split_file", "path", "sha256"} or {"shots", "seed"}


def training_pool(data: str) -> Pool:
    """Every training image of ``data`` as the feature extractor orders them (broken files not yet left out):
    folders in ImageFolder's order (sorted classes, sorted files), the built-in subset by index."""
    if is_builtin(data):
        labels = subset_arrays("train")[1].numpy().astype(np.int64)
        return Pool([str(i) for i in range(len(labels))], labels, list(FASHION_MNIST_CLASSES))
    split_dir = check_imagefolder(data, "train")
    classes, class_to_idx = find_classes(str(split_dir))
    samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS)
    names = [Path(os.path.relpath(path, split_dir)).as_posix() for path, _ in samples]
    return Pool(names, np.array([label for _, label in samples], dtype=np.int64), list(classes))


def read_split_file(path: str | Path) -> tuple[list[str], str]:
    """(the non-blank lines, stripped; the file's sha256) of a split file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise MimbenchError(f"Split file {path} cannot be read ({err.strerror or err}).",
                            "Pass --split-file a text file with one training image name per line.") from None
    lines = [line.strip() for line in raw.decode("utf-8", errors="replace").splitlines()]
    return [line for line in lines if line], hashlib.sha256(raw).hexdigest()


def _by_name(pool: Pool) -> tuple[dict[str, int], dict[str, int]]:
    """(path -> row, bare file name -> row; a bare name held by two class folders maps to -1: ambiguous)."""
    paths = {name: i for i, name in enumerate(pool.names)}
    bare: dict[str, int] = {}
    for i, name in enumerate(pool.names):
        base = name.rsplit("/", 1)[-1]
        bare[base] = -1 if base in bare else i
    return paths, bare


def split_indices(pool: Pool, lines: list[str], where: str) -> np.ndarray:
    """The pool rows the lines of split file ``where`` name; MimbenchError for unknown, ambiguous or
    repeated names."""
    paths, bare = _by_name(pool)
    rows, missing, ambiguous = [], [], []
    for line in lines:
        row = paths.get(line, bare.get(line) if "/" not in line else None)
        if row is None:
            missing.append(line)
        elif row < 0:
            ambiguous.append(line)
        else:
            rows.append(row)
    if missing:
        raise MimbenchError(
            f"Split file {where} names {len(missing)} image(s) that the training split does not have (or that "
            f"data.limit_train / a broken-file skip left out), e.g. {', '.join(missing[:SHOW_MISSING])}.",
            "Give the split file of this dataset (SimCLR / MSN files name ImageNet-1k train images; for the built-in "
            "data a line is an image index), or the full training tree.")
    if ambiguous:
        raise MimbenchError(f"Split file {where}: {len(ambiguous)} file name(s) are in several class folders, e.g. "
                            f"{', '.join(ambiguous[:SHOW_MISSING])}.", "Write those lines as class/file.")
    if len(set(rows)) != len(rows):
        raise MimbenchError(f"Split file {where} names {len(rows) - len(set(rows))} image(s) more than once.",
                            "List each training image once.")
    return np.array(rows, dtype=np.int64)


def check_classes(pool: Pool, indices: np.ndarray, where: str) -> None:
    """Every class of the pool has an image among ``indices``; MimbenchError naming the empty ones."""
    counts = np.bincount(pool.labels[indices], minlength=len(pool.classes))
    empty = [pool.classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise MimbenchError(f"{where} leaves {len(empty)} class(es) without a training image: "
                            f"{', '.join(empty[:SHOW_MISSING])}.",
                            "Use a subset with at least one image of every class (or a tree without those classes).")


def shot_indices(pool: Pool, shots: int, seed: int) -> np.ndarray:
    """``shots`` rows per class of the pool, drawn without replacement with ``numpy.random.default_rng(seed)``
    class by class in class order; sorted."""
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(pool.labels == c), size=shots, replace=False)
              for c in range(len(pool.classes))]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def images_sha256(pool: Pool, rows: np.ndarray) -> str:
    """sha256 of the images of ``rows`` written as a split file: one pool name per line, in pool order."""
    return hashlib.sha256("".join(f"{pool.names[i]}\n" for i in np.sort(rows)).encode()).hexdigest()


def plan(pool: Pool, section, seed: int) -> list[Subset]:
    """The runs of the ``lowshot`` config section on ``pool``; every bad-input check happens here."""
    files, shots = list(section.split_files), section.shots
    if bool(files) == (shots is not None):
        raise MimbenchError("A low-shot run needs either split files or shots per class (not both, not neither).",
                            "Pass --split-file FILE (repeatable) or --shots K [--seeds N].")
    if len(pool.classes) < 3:
        raise MimbenchError(f"The training split has {len(pool.classes)} class(es); MSN's multiclass logistic "
                            "regression needs at least 3.", "Use a dataset with 3 or more classes.")
    if shots is not None:
        # a class the subsampled training split (data.limit_train, broken-file skips) has no image of: said as such
        check_classes(pool, np.arange(len(pool.names)), "The training split (after data.limit_train)")
        smallest = int(np.bincount(pool.labels, minlength=len(pool.classes)).min())
        if shots > smallest:
            raise MimbenchError(f"--shots {shots} is more than the smallest class holds ({smallest} images).",
                                f"Use --shots {smallest} or fewer.")
        draws = [(seed + i, shot_indices(pool, int(shots), seed + i)) for i in range(int(section.seeds))]
        return [Subset(rows, s, {"shots": int(shots), "seed": s, "images_sha256": images_sha256(pool, rows)})
                for s, rows in draws]
    runs = []
    for file in files:
        lines, sha = read_split_file(file)
        rows = split_indices(pool, lines, file)
        check_classes(pool, rows, f"Split file {file}")
        runs.append(Subset(rows, seed, {"split_file": Path(file).name, "path": str(Path(file).resolve()),
                                        "sha256": sha, "images_sha256": images_sha256(pool, rows)}))
    return runs


def centre_normalise(x) -> np.ndarray:
    """Each row minus its mean, divided by its L2 norm (float64): cyanure's ``preprocess(centering=True,
    normalize=True, columns=False)`` as MSN calls it."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def logreg_objective(weights: np.ndarray, x: np.ndarray, y: np.ndarray, lambda_1: float) -> float:
    """The objective cyanure's multiclass logistic regression (L2, no intercept) minimises: mean softmax
    cross-entropy of ``x @ weights`` (N×D, D×C) against ``y`` plus ``lambda_1 / 2 * ||weights||^2``."""
    scores = x @ weights
    top = scores.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(scores - top).sum(axis=1))
    loss = log_norm - scores[np.arange(len(y)), y]
    return float(loss.mean() + 0.5 * lambda_1 * np.sum(weights * weights))


def solver():
    """(cyanure's ``Classifier``, scikit-learn's ``ConvergenceWarning``); MimbenchError naming the extra when
    cyanure is not installed."""
    try:
        from cyanure.estimators import Classifier  # optional extra "lowshot"
        from sklearn.exceptions import ConvergenceWarning  # a dependency of cyanure
    except ImportError:
        raise MimbenchError("The low-shot evaluation needs cyanure, which is not installed.", EXTRA_FIX) from None
    return Classifier, ConvergenceWarning


def fit_logreg(x: np.ndarray, y: np.ndarray, *, lambd: float, tol: float, max_iter: int, seed: int = 0):
    """(weights D×C, solver info) of MSN's logistic regression on preprocessed features ``x`` (N×D) and labels
    ``y`` (N, every class 0..C-1 present): cyanure ``Classifier(loss='multiclass-logistic', penalty='l2',
    fit_intercept=False, lambda_1=lambd / N)``."""
    Classifier, ConvergenceWarning = solver()
    lambda_1 = float(lambd) / len(y)
    clf = Classifier(loss="multiclass-logistic", penalty="l2", fit_intercept=False, lambda_1=lambda_1, tol=float(tol),
                     max_iter=int(max_iter), solver="auto", random_state=int(seed), verbose=False,
                     # the process's thread budget: cyanure's default (-1, every core) resets OpenMP's thread count,
                     # which torch shares, for every later step of the process (a pipeline worker has 1)
                     n_threads=torch.get_num_threads())
    with warnings.catch_warnings():  # reaching max_iter (MSN's 300 epochs) is recorded as converged=False instead
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(np.ascontiguousarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64))
    weights = np.asarray(clf.coef_, dtype=np.float64).reshape(x.shape[1], -1)
    epochs = int(np.max(clf.n_iter_))
    return weights, {"lambda_1": lambda_1, "epochs": epochs, "converged": epochs < int(max_iter)}


def subset_overrides(split_file=None, shots: int | None = None, seeds: int | None = None) -> list[str]:
    """``--set`` overrides of the ``lowshot`` section from ``--split-file`` (one path or several), ``--shots`` and
    ``--seeds``; a split file clears the config's shots and shots clear its split files."""
    files = [split_file] if isinstance(split_file, (str, Path)) else list(split_file or [])
    if files and shots is not None:
        raise MimbenchError("--split-file and --shots were both given.", "Pass one of them.")
    overrides = []
    if files:
        overrides += [format_override("lowshot.split_files", [str(f) for f in files]),
                      format_override("lowshot.shots", None)]
    if shots is not None:
        overrides += [format_override("lowshot.shots", int(shots)), format_override("lowshot.split_files", [])]
    if seeds is not None:
        overrides.append(format_override("lowshot.seeds", int(seeds)))
    return overrides


def _scores(x: np.ndarray, weights: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x @ weights).float()


def _fit_run(run, subset: Subset, train_x, train_y, val_x: np.ndarray, val_y: torch.Tensor, common: dict) -> dict:
    """Train on one subset, score the validation features, write the run's record in ``<out>/runs/``."""
    cfg = run.cfg.classifier
    x, y = centre_normalise(train_x[subset.indices]), np.asarray(train_y[subset.indices], dtype=np.int64)
    weights, info = fit_logreg(x, y, lambd=float(cfg.lambd), tol=float(cfg.tol), max_iter=int(cfg.max_iter),
                               seed=subset.seed)
    metrics = runner.topk_metrics(_scores(val_x, weights), val_y)
    metrics["train_top1"] = runner.topk_metrics(_scores(x, weights), torch.from_numpy(y))["top1"]
    per_class = np.bincount(y)
    subset_info = {**subset.source, "images": int(len(y)),
                   "per_class": {"min": int(per_class.min()), "max": int(per_class.max())}}
    classifier = {"name": str(cfg.name), "loss": "multiclass-logistic", "penalty": "l2", "fit_intercept": False,
                  "lambd": float(cfg.lambd), "tol": float(cfg.tol), "max_iter": int(cfg.max_iter), **info}
    runs_dir = run.out / RUNS_DIR
    if run.is_main:
        runs_dir.mkdir(parents=True, exist_ok=True)
    record = runner.finish(dataclasses.replace(run, out=runs_dir, seed=subset.seed),
                           protocol={**common, "classifier": classifier, "subset": subset_info}, metrics=metrics,
                           dataset={"sizes": {"train": int(len(y)), "val": int(len(val_y)),
                                              "pool": int(len(train_y))}})
    return {**subset_info, "top1": metrics["top1"], "top5": metrics["top5"],
            "record": f"{RUNS_DIR}/{record['task']}-{record['run_id']}.json"}


def summarise(runs: list[dict]) -> dict:
    """Mean and sample standard deviation (ddof 1; None for one run) of top-1 / top-5 over ``runs``."""
    metrics: dict = {}
    for key in ("top1", "top5"):
        values = np.array([r[key] for r in runs], dtype=np.float64)
        metrics[key] = float(values.mean())
        metrics[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
    metrics["runs"] = len(runs)
    return metrics


def _features(run):
    """(train features, labels, info), (val features, labels, info) from the shared feature cache."""
    cfg = run.cfg
    common = dict(cache_dir=Path(cfg.cache_dir or run.out / "feature_cache"), img_size=cfg.img_size,
                  batch_size=int(cfg.batch_size), num_workers=int(cfg.data.num_workers), amp=run.amp,
                  max_bad_fraction=runner.max_bad_fraction(run), layout=run.layout)
    return (extract_features(run.encoder, run.data, "train", limit=cfg.data.limit_train, **common),
            extract_features(run.encoder, run.data, "val", limit=cfg.data.limit_val, **common))


def run_lowshot(*, encoder: Path, config: Path, data: str, out: Path, overrides: list[str] = (), resume: bool = False,
                layout: str = "auto", split_file=None, shots: int | None = None, seeds: int | None = None) -> dict:
    """Low-shot evaluation of ``encoder`` on ``data``: one logistic regression per split file or seed, each run's
    record in ``out/runs/``, the summary (mean ± std) in ``out`` and returned. ``split_file`` / ``shots`` /
    ``seeds`` (``--split-file`` / ``--shots`` / ``--seeds``) replace the config's ``lowshot`` values.
    ``resume`` has no effect beyond the feature cache, which is always reused when it matches."""
    overrides = list(overrides) + subset_overrides(split_file, shots, seeds)
    run = runner.start("lowshot", encoder=encoder, config=config, data=data, out=out, overrides=overrides,
                       layout=layout)
    cfg = run.cfg
    listed = training_pool(run.data)
    plan(listed.limited(cfg.data.limit_train), cfg.lowshot, run.seed)  # bad input refused before any feature
    solver()  # and a missing cyanure
    if FEATURE_DEVIATION not in run.deviations:
        run.deviations.insert(0, FEATURE_DEVIATION)
    (train_x, train_y, train_info), (val_x, val_y, val_info) = _features(run)
    pool = listed.without({s["file"] for s in train_info["skipped"]}).limited(cfg.data.limit_train)
    if len(pool.names) != len(train_y) or not np.array_equal(pool.labels, np.asarray(train_y)):
        raise MimbenchError(f"The training images listed ({len(pool.names)}) and the feature rows ({len(train_y)}) "
                            "differ.", "This is a bug; please report it with the command line.")
    subsets = plan(pool, cfg.lowshot, run.seed)
    common = {"feature": FEATURE, "transform": val_info["transform"], "img_size": val_info["img_size"]}
    val = centre_normalise(val_x)
    labels = torch.from_numpy(np.asarray(val_y, dtype=np.int64))
    runs = [_fit_run(run, s, train_x, train_y, val, labels, common) for s in subsets]
    return runner.finish(
        run, protocol={**common, "classifier": {"name": str(cfg.classifier.name), "lambd": float(cfg.classifier.lambd)},
                       "aggregate": "mean and sample std (ddof 1) over the runs", "runs": runs},
        metrics=summarise(runs),
        dataset={"sizes": {"train": int(len(train_y)), "val": int(len(val_y))},
                 "skipped": {"train": train_info["skipped"], "val": val_info["skipped"]}})
