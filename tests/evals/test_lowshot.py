"""`mimbench eval lowshot`: the training subset (split files, shots over seeds), MSN's logistic-regression
objective as cyanure solves it, the records, and the inputs refused before any feature is computed."""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.optimize import minimize
from typer.testing import CliRunner

from mimbench.cli import app
from mimbench.errors import MimbenchError
from mimbench.evals import lowshot, run_eval

REPO = Path(__file__).resolve().parents[2]
PROTOCOL = REPO / "eval_configs" / "lowshot" / "msn_logreg_in1k.py"
DEMO = REPO / "eval_configs" / "demo" / "lowshot_fmnist.py"
CLASSES = ("n01440764", "n01443537", "n01484850")
N_TRAIN = 6
#: The only overrides the shipped protocol config gets on the small tree: sizes (and no loader processes).
SIZES = ["img_size=32", "batch_size=16", "data.num_workers=0"]
#: Builtin data at test size: the first 600 training and 200 validation images.
BUILTIN_LIMITS = ["data.limit_train=600", "data.limit_val=200"]


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
    """ImageNet layout, 3 classes x (6 train, 3 val) JPEG images named as ImageNet's (``<wnid>_<i>.JPEG``)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("val", 3)):
        for c, wnid in enumerate(CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (40, 48, 3), dtype=np.uint8)
                pixels[..., c] += 180
                Image.fromarray(pixels, "RGB").save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


def _split_file(path: Path, lines) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("lowshot-*.json"))]


class _Attr(dict):
    """A dict read by attribute, as a loaded config section is."""

    def __getattr__(self, key):
        return self[key]


@pytest.fixture
def fits(monkeypatch):
    """Every fit_logreg call's labels (the real solver still runs)."""
    calls, real = [], lowshot.fit_logreg

    def spy(x, y, **kwargs):
        calls.append(np.asarray(y).copy())
        return real(x, y, **kwargs)

    monkeypatch.setattr(lowshot, "fit_logreg", spy)
    return calls


# ---------------------------------------------------------------------------- split files


def test_a_split_file_trains_on_exactly_the_images_it_lists(tiny_encoder, jpeg_tree, tmp_path, fits):
    # SimCLR / MSN lines are bare file names; a class/file line works too; blank lines are ignored.
    listed = [f"{CLASSES[0]}_1.JPEG", f"{CLASSES[0]}_4.JPEG", f"{CLASSES[1]}/{CLASSES[1]}_0.JPEG",
              f"{CLASSES[2]}_2.JPEG", f"{CLASSES[2]}_3.JPEG", f"{CLASSES[2]}_5.JPEG"]
    split = _split_file(tmp_path / "split.txt", listed[:3] + [""] + listed[3:])
    pool = lowshot.training_pool(str(jpeg_tree))
    (subset,) = lowshot.plan(pool, _Attr(split_files=[str(split)], shots=None, seeds=3), 0)
    chosen = sorted(pool.names[i].rsplit("/", 1)[-1] for i in subset.indices)
    assert chosen == sorted(name.rsplit("/", 1)[-1] for name in listed)
    assert [pool.classes[label] for label in pool.labels[subset.indices]] == [name[:9] for name in listed]

    out = tmp_path / "run"
    record = run_eval("lowshot", encoder=tiny_encoder, config=PROTOCOL, data=str(jpeg_tree), out=out,
                      overrides=SIZES, split_file=[split])
    (labels,) = fits
    assert len(labels) == len(listed) and np.bincount(labels).tolist() == [2, 1, 3]
    (run,) = _records(out / "runs")
    assert run["dataset"]["sizes"] == {"train": 6, "val": 9, "pool": 18}
    assert run["protocol"]["subset"]["per_class"] == {"min": 1, "max": 3}
    assert run["protocol"]["subset"]["sha256"] == hashlib.sha256(split.read_bytes()).hexdigest()
    assert record["metrics"]["runs"] == 1 and record["metrics"]["top1_std"] is None
    assert record["metrics"]["top1"] == run["metrics"]["top1"]


def test_the_shipped_protocol_config_runs_msn_split_files_and_records_each(tiny_encoder, jpeg_tree, tmp_path):
    """Three MSN-style split files, one of them named as MSN's split-3 five-shot file (3imgs_class.txt, five
    images per class): one run each, the image count read from the lines, mean ± std over the three."""
    files = []
    for k, (name, shots) in enumerate((("1imgs_class.txt", 1), ("2imgs_class.txt", 2), ("3imgs_class.txt", 5))):
        folder = tmp_path / f"imagenet_subsets{k + 1}"
        folder.mkdir()
        lines = [f"{c}_{(i + k) % N_TRAIN}.JPEG" for c in CLASSES for i in range(shots)]
        files.append(_split_file(folder / name, lines))
    out = tmp_path / "run"
    record = run_eval("lowshot", encoder=tiny_encoder, config=PROTOCOL, data=str(jpeg_tree), out=out,
                      overrides=SIZES, split_file=files)
    runs = {r["protocol"]["subset"]["path"]: r for r in _records(out / "runs")}
    assert len(runs) == 3 and record["metrics"]["runs"] == 3
    for path, shots in zip(files, (1, 2, 5)):
        run = runs[str(path.resolve())]
        assert run["protocol"]["subset"]["split_file"] == path.name
        assert run["protocol"]["subset"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert run["protocol"]["subset"]["per_class"] == {"min": shots, "max": shots}
        assert run["dataset"]["sizes"]["train"] == 3 * shots
        assert run["protocol"]["classifier"]["lambda_1"] == pytest.approx(0.00025 / (3 * shots))
    top1 = [r["metrics"]["top1"] for r in runs.values()]
    assert record["metrics"]["top1"] == pytest.approx(np.mean(top1))
    assert record["metrics"]["top1_std"] == pytest.approx(np.std(top1, ddof=1))
    assert [r["sha256"] for r in record["protocol"]["runs"]] == [hashlib.sha256(f.read_bytes()).hexdigest()
                                                                 for f in files]
    # the only departure: the feature (MSN takes the class token before the final norm)
    assert record["protocol"]["deviations"] == [lowshot.FEATURE_DEVIATION]
    assert record["protocol"]["classifier"] == {"name": "msn-logreg", "lambd": 0.00025}
    assert len(_records(out)) == 1  # the summary; the runs are in out/runs


# ---------------------------------------------------------------------------- shots over seeds


def test_shots_over_seeds_give_one_run_per_seed_and_their_mean_and_std(tiny_encoder, tmp_path, fits):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "lowshot", "--encoder", str(tiny_encoder), "--out", str(out),
                                      "--shots", "2", "--seeds", "3", *sum((["--set", s] for s in BUILTIN_LIMITS), [])])
    assert result.exit_code == 0, result.output
    assert "lowshot: top1=" in result.output and "top1_std=" in result.output
    (summary,) = _records(out)
    runs = _records(out / "runs")
    assert len(runs) == 3 and len(fits) == 3
    assert sorted(r["seed"] for r in runs) == [0, 1, 2]
    assert all(np.bincount(labels, minlength=10).tolist() == [2] * 10 for labels in fits)
    subsets = [r["protocol"]["subset"]["images_sha256"] for r in runs]
    assert all(r["protocol"]["subset"]["shots"] == 2 and r["dataset"]["sizes"]["train"] == 20 for r in runs)
    top1 = [r["metrics"]["top1"] for r in runs]
    assert summary["metrics"]["runs"] == 3 and len(set(subsets)) == 3
    assert summary["metrics"]["top1"] == pytest.approx(np.mean(top1))
    assert summary["metrics"]["top1_std"] == pytest.approx(np.std(top1, ddof=1))
    assert summary["metrics"]["top5_std"] == pytest.approx(np.std([r["metrics"]["top5"] for r in runs], ddof=1))
    assert "lowshot.shots=2" in summary["protocol"]["overrides"]


def test_shot_draws_follow_the_seed_and_differ_between_seeds():
    pool = lowshot.Pool([str(i) for i in range(40)], np.arange(40) % 4, ["a", "b", "c", "d"])
    first, again, other = (lowshot.shot_indices(pool, 3, s) for s in (5, 5, 6))
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert np.bincount(pool.labels[first]).tolist() == [3, 3, 3, 3] and len(set(first)) == 12


def test_the_demo_config_on_the_builtin_data(tiny_encoder, tmp_path):
    record = run_eval("lowshot", encoder=tiny_encoder, config=DEMO, data="builtin:fashion-mnist", out=tmp_path,
                      overrides=BUILTIN_LIMITS)
    runs = _records(tmp_path / "runs")
    assert record["metrics"]["runs"] == 3 and len(runs) == 3
    assert {r["dataset"]["sizes"]["train"] for r in runs} == {100}  # 10 shots x 10 classes
    assert 0.0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 100.0
    assert record["metrics"]["top1_std"] >= 0.0


def test_a_builtin_split_file_lists_image_indices(tiny_encoder, tmp_path, fits):
    pool = lowshot.training_pool("builtin:fashion-mnist").limited(600)
    picked = [int(np.flatnonzero(pool.labels == c)[k]) for c in range(10) for k in range(2)]
    split = _split_file(tmp_path / "fmnist_2shot.txt", picked)
    run_eval("lowshot", encoder=tiny_encoder, config=DEMO, data="builtin:fashion-mnist", out=tmp_path / "run",
             overrides=BUILTIN_LIMITS, split_file=split)
    (labels,) = fits
    assert sorted(labels.tolist()) == sorted(pool.labels[picked].tolist())
    (run,) = _records(tmp_path / "run" / "runs")
    assert run["dataset"]["sizes"]["train"] == 20 and run["protocol"]["subset"]["split_file"] == split.name


# ---------------------------------------------------------------------------- the objective


@pytest.mark.parametrize("lambd", [0.00025, 3.0])
def test_cyanure_minimises_msn_logistic_objective(lambd):
    """The weights cyanure returns reach the minimum of the objective as written (mean softmax cross-entropy +
    lambda_1 / 2 ||W||^2, lambda_1 = lambd / N, no intercept) within 1e-4; the reference is scipy's L-BFGS on
    that objective. lambd 3.0 makes the penalty large enough that another convention (lambda_1 ||W||^2) fails."""
    rng = np.random.default_rng(0)
    n, d, c = 300, 8, 4
    y = np.arange(n) % c
    x = rng.normal(size=(n, d))
    x[:, :c] += 1.5 * np.eye(c)[y]  # informative but overlapping classes: a finite minimiser
    x = lowshot.centre_normalise(x)
    assert np.allclose(x.mean(axis=1), 0) and np.allclose(np.linalg.norm(x, axis=1), 1)
    weights, info = lowshot.fit_logreg(x, y, lambd=lambd, tol=1e-3, max_iter=300)
    lambda_1 = info["lambda_1"]
    assert lambda_1 == pytest.approx(lambd / n) and weights.shape == (d, c)

    def minimiser(lam):
        def objective(flat):
            w = flat.reshape(d, c)
            scores = x @ w
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            grad = x.T @ (p - np.eye(c)[y]) / n + lam * w
            return lowshot.logreg_objective(w, x, y, lam), grad.ravel()

        found = minimize(objective, np.zeros(d * c), jac=True, method="L-BFGS-B",
                         options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000})
        assert found.success
        return found

    ref = minimiser(lambda_1)
    assert abs(lowshot.logreg_objective(weights, x, y, lambda_1) - ref.fun) < 1e-4
    if lambd > 1:  # the minimiser of lambda_1 ||W||^2 (another convention) misses it: the test tells them apart
        other = minimiser(2 * lambda_1).x.reshape(d, c)
        assert lowshot.logreg_objective(other, x, y, lambda_1) - ref.fun > 1e-4


def test_the_objective_matches_its_definition_on_a_hand_computed_case():
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    w = np.array([[1.0, 0.0], [0.0, 2.0]])
    y = np.array([0, 1])
    loss = (np.log(np.e + 1) - 1 + np.log(1 + np.e ** 2) - 2) / 2
    assert lowshot.logreg_objective(w, x, y, 0.5) == pytest.approx(loss + 0.25 * 5)


# ---------------------------------------------------------------------------- bad input


def _refused(tiny_encoder, data, out, match, **options):
    with pytest.raises(MimbenchError, match=match):
        run_eval("lowshot", encoder=tiny_encoder, config=PROTOCOL if data != "builtin:fashion-mnist" else DEMO,
                 data=data, out=out, overrides=SIZES if data != "builtin:fashion-mnist" else BUILTIN_LIMITS, **options)
    assert not (out / "feature_cache").exists()  # refused before any feature was computed


def test_a_split_file_naming_absent_images_is_refused_with_the_first_names_and_the_count(tiny_encoder, jpeg_tree,
                                                                                         tmp_path):
    absent = [f"n09999999_{i}.JPEG" for i in range(7)]
    split = _split_file(tmp_path / "1percent.txt", [f"{CLASSES[0]}_0.JPEG"] + absent)
    _refused(tiny_encoder, str(jpeg_tree), tmp_path / "a", r"names 7 image\(s\).*n09999999_0\.JPEG, n09999999_1\.JPEG",
             split_file=split)
    _refused(tiny_encoder, "builtin:fashion-mnist", tmp_path / "b", r"names 1 image\(s\).*600",
             split_file=_split_file(tmp_path / "idx.txt", [str(i) for i in range(601)]))


def test_a_class_left_empty_is_refused(tiny_encoder, jpeg_tree, tmp_path):
    split = _split_file(tmp_path / "two_classes.txt", [f"{c}_0.JPEG" for c in CLASSES[:2]])
    _refused(tiny_encoder, str(jpeg_tree), tmp_path / "a", f"1 class\\(es\\) without a training image: {CLASSES[2]}",
             split_file=split)


def test_a_class_that_subsampling_leaves_empty_is_refused_before_drawing_shots(tiny_encoder, jpeg_tree, tmp_path):
    # the first 10 of the 18 training images (class order): 6 of the first class, 4 of the second, none of the third
    out = tmp_path / "a"
    with pytest.raises(MimbenchError, match=r"The training split \(after data.limit_train\) leaves 1 class\(es\) "
                                            f"without a training image: {CLASSES[2]}"):
        run_eval("lowshot", encoder=tiny_encoder, config=PROTOCOL, data=str(jpeg_tree), out=out,
                 overrides=[*SIZES, "data.limit_train=10"], shots=2)
    assert not (out / "feature_cache").exists()  # refused before any feature was computed


def test_more_shots_than_the_smallest_class_are_refused(tiny_encoder, jpeg_tree, tmp_path):
    _refused(tiny_encoder, str(jpeg_tree), tmp_path / "a", r"--shots 7 is more than the smallest class holds "
             r"\(6 images\)", shots=7)
    _refused(tiny_encoder, "builtin:fashion-mnist", tmp_path / "b", "more than the smallest class", shots=500)


def test_other_bad_subsets_are_refused(tiny_encoder, jpeg_tree, tmp_path):
    split = _split_file(tmp_path / "s.txt", [f"{c}_0.JPEG" for c in CLASSES] + [f"{CLASSES[0]}_0.JPEG"])
    _refused(tiny_encoder, str(jpeg_tree), tmp_path / "a", "more than once", split_file=split)
    _refused(tiny_encoder, str(jpeg_tree), tmp_path / "b", "both given", split_file=split, shots=1)
    _refused(tiny_encoder, str(jpeg_tree), tmp_path / "c", "either split files or shots")  # the protocol sets neither


def test_without_cyanure_the_error_names_the_extra_before_any_feature(monkeypatch, tiny_encoder, tmp_path):
    monkeypatch.setitem(sys.modules, "cyanure.estimators", None)  # import fails as when the package is absent
    with pytest.raises(MimbenchError, match="needs cyanure") as err:
        lowshot.fit_logreg(np.eye(3), np.arange(3), lambd=0.00025, tol=1e-3, max_iter=10)
    assert "mimbench[lowshot]" in err.value.fix
    _refused(tiny_encoder, "builtin:fashion-mnist", tmp_path / "run", "needs cyanure")


def test_the_protocol_config_carries_msn_values():
    """facebookresearch/msn logistic_eval.py: lambd 0.00025 (divided by N in the solver), tol 1e-3, 300 epochs, 224."""
    from mimbench.config import load_config

    cfg = load_config(PROTOCOL, kind="lowshot")
    assert dict(cfg.classifier) == {"name": "msn-logreg", "lambd": 0.00025, "tol": 1e-3, "max_iter": 300}
    assert cfg.img_size == 224 and cfg.deviations == [] and cfg.lowshot.seeds == 3
    assert cfg.lowshot.split_files == [] and cfg.lowshot.shots is None  # the subset comes from the command line
    demo = load_config(DEMO, kind="lowshot")
    assert (demo.lowshot.shots, demo.lowshot.seeds) == (10, 3) and demo.classifier == cfg.classifier
