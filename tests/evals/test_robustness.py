"""Robustness from one fine-tune (MAE Table 13): the authors' class subsets, ImageNetV2's integer folders, the mCE
formula, every set's layout end to end on small JPEG trees, Fashion-MNIST-C, and the errors for bad input."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image
from typer.testing import CliRunner

from mimbench.cli import app
from mimbench.data import FASHION_MNIST_CLASSES, IMAGENET_MEAN, IMAGENET_STD
from mimbench.errors import MimbenchError
from mimbench.evals import run_eval
from mimbench.evals.classifier import MODEL_FILE, save_classifier
from mimbench.evals.finetune import build_model
from mimbench.evals.robustness import (
    ALEXNET_ERRORS, CLASS_SUBSETS, IMAGENET_C_CORRUPTIONS, build_fashion_mnist_c, imagenet_c_layout, imagenet_wnids,
    mce, v2_samples, wnid_samples,
)
from mimbench.results.report import write_report

INFO = Path(timm.data.__file__).parent / "_info"
PROTOCOL = "eval_configs/robustness/mae_table13.py"
DEMO = "eval_configs/demo/robustness_fmnist.py"
ENCODER = {"path": "enc.safetensors", "sha256": "0" * 64, "arch": "vit-test/8", "technique": "mae", "epochs": 1.0}
SMALL = ["allow_subset=True", "batch_size=8", "data.num_workers=0", "runtime.amp=none"]


def _timm_list(name: str) -> list:
    return (INFO / name).read_text().split()


def test_class_subsets_are_the_authors_lists():
    assert CLASS_SUBSETS["in-a"] == [int(i) for i in _timm_list("imagenet_a_indices.txt")]
    assert CLASS_SUBSETS["in-r"] == [int(i) for i in _timm_list("imagenet_r_indices.txt")]
    assert len(CLASS_SUBSETS["in-a"]) == len(CLASS_SUBSETS["in-r"]) == 200
    assert len(set(CLASS_SUBSETS["in-a"]) & set(CLASS_SUBSETS["in-r"])) == 86
    # label i of the sorted wnid folders is the i-th index: the subsets' wnids are in sorted order
    wnids = imagenet_wnids()
    assert list(wnids) == _timm_list("imagenet_synsets.txt") and list(wnids) == sorted(wnids)
    assert [wnids[i] for i in CLASS_SUBSETS["in-a"]] == _timm_list("imagenet_a_synsets.txt")
    assert [wnids[i] for i in CLASS_SUBSETS["in-r"]] == _timm_list("imagenet_r_synsets.txt")


def test_mce_by_hand():
    # every corruption at half AlexNet's error (CE 50) but contrast at twice it (CE 200): (14 * 50 + 200) / 15 = 60
    errors = {c: [a / 2] * 5 for c, a in ALEXNET_ERRORS.items()}
    errors["contrast"] = [2 * ALEXNET_ERRORS["contrast"] - 0.1, 2 * ALEXNET_ERRORS["contrast"] + 0.1,
                          2 * ALEXNET_ERRORS["contrast"], 2 * ALEXNET_ERRORS["contrast"], 2 * ALEXNET_ERRORS["contrast"]]
    assert mce(errors) == pytest.approx(60.0)
    assert mce({**errors, "speckle_noise": [1.0] * 5, "saturate": [0.0] * 5}) == pytest.approx(60.0)  # extras: never
    assert mce({c: [0.1, 0.2, 0.3, 0.4, 0.5] for c in ALEXNET_ERRORS}) == pytest.approx(
        np.mean([30.0 / a for a in ALEXNET_ERRORS.values()]))
    # another normaliser (the demo's reference model): a 0.25 vs 0.5 -> CE 50, b 0.5 vs 0.25 -> CE 200
    assert mce({"a": [0.25, 0.25], "b": [0.5, 0.5]}, normalisers={"a": 0.5, "b": 0.25}) == pytest.approx(125.0)
    with pytest.raises(MimbenchError, match="1 of the 15 corruptions of the mCE: fog"):
        mce({c: v for c, v in errors.items() if c != "fog"})
    with pytest.raises(MimbenchError, match="severities 1-5"):
        mce({**errors, "snow": [0.5] * 4})


def _jpegs(folder: Path, n: int, size: int = 36, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, n, len(str(folder))])
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.JPEG")


def test_v2_integer_folders_map_by_their_value(tmp_path):
    for k in range(12):
        _jpegs(tmp_path / "v2" / str(k), 1)
    samples, layout = v2_samples(tmp_path / "v2", allow_subset=True)
    assert layout == "integer"
    assert {Path(p).parent.name: label for p, label in samples}["10"] == 10  # a string sort would say 2
    assert sorted(label for _, label in samples) == list(range(12))
    with pytest.raises(MimbenchError, match="holds 12 class folders; ImageNetV2 has 1000"):
        v2_samples(tmp_path / "v2")
    _jpegs(tmp_path / "v2" / "n01440764", 1)
    with pytest.raises(MimbenchError, match="ambiguous: 12 integer folders .* 1 wnid folders"):
        v2_samples(tmp_path / "v2", allow_subset=True)


def test_wrong_class_folders_and_missing_corruptions_are_named(tmp_path):
    a_wnids = [imagenet_wnids()[i] for i in CLASS_SUBSETS["in-a"]]
    _jpegs(tmp_path / "a" / a_wnids[0], 1)
    _jpegs(tmp_path / "a" / imagenet_wnids()[0], 1)  # an ImageNet class that is not in ImageNet-A
    with pytest.raises(MimbenchError, match="1 folders that are not ImageNet-A classes: n01440764"):
        wnid_samples(tmp_path / "a", a_wnids, "ImageNet-A")
    (tmp_path / "a" / imagenet_wnids()[0] / "img0.JPEG").unlink()
    (tmp_path / "a" / imagenet_wnids()[0]).rmdir()
    with pytest.raises(MimbenchError, match="holds 1 class folders; ImageNet-A has 200"):
        wnid_samples(tmp_path / "a", a_wnids, "ImageNet-A")
    for s in (1, 2, 3, 5):
        (tmp_path / "c" / "fog" / str(s)).mkdir(parents=True)
    found, missing = imagenet_c_layout(tmp_path / "c")
    assert list(found) == ["fog"] and "fog/4" in missing and "gaussian_noise" in missing and len(missing) == 15


@pytest.fixture(scope="module")
def imagenet_model(tmp_path_factory):
    """A tiny 1000-class ImageNet classifier whose logits are its head bias alone (weight 0): bias 100 on class 0
    (in neither IN-A nor IN-R), 70 on class 10 (in neither either), 60 on IN-R's first class, 50 on IN-A's 6th."""
    from mimbench.testing import write_tiny_encoder

    root = tmp_path_factory.mktemp("robust")
    encoder = write_tiny_encoder(root / "enc.safetensors")
    model = build_model(encoder, 1000, img_size=32, drop_path=0.0)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[0] = 100.0
        model.head.bias[10] = 70.0
        model.head.bias[CLASS_SUBSETS["in-r"][0]] = 60.0
        model.head.bias[CLASS_SUBSETS["in-a"][5]] = 50.0
    record = {"run_id": "cd" * 16, "task": "finetune", "protocol": {"name": "mae_vit-b_in1k"},
              "encoder": ENCODER}
    save_classifier(model, root / "ft" / MODEL_FILE, record=record, encoder_metadata=model.mimbench_metadata,
                    model_kwargs={"global_pool": "avg", "fc_norm": True, "num_classes": 1000}, img_size=32,
                    classes=imagenet_wnids(), mean=IMAGENET_MEAN, std=IMAGENET_STD, data="/data/imagenet",
                    eval_transform="resize36/centercrop32")
    return root / "ft"


def _trees(root: Path) -> dict[str, Path]:
    wnids = imagenet_wnids()
    for k in (5, 77):  # 2 images each: predicting the 6th class is right on half
        _jpegs(root / "in-a" / wnids[CLASS_SUBSETS["in-a"][k]], 2)
    for k in (0, 150):
        _jpegs(root / "in-r" / wnids[CLASS_SUBSETS["in-r"][k]], 2)
    for k in (10, 4, 500):
        _jpegs(root / "sketch" / wnids[k], 1)
    for k in range(12):  # folder "10" holds 2 of the 13 images
        _jpegs(root / "v2" / str(k), 2 if k == 10 else 1)
    for corruption in IMAGENET_C_CORRUPTIONS + ("speckle_noise",):
        for s in range(1, 6):
            for k in (10, 4):  # without class 0's bias class 10 is predicted: error 50 % everywhere
                _jpegs(root / "in-c" / corruption / str(s) / wnids[k], 1, size=32)
    return {name: root / name for name in ("in-a", "in-r", "sketch", "v2", "in-c")}


def test_every_set_end_to_end_on_jpeg_trees(imagenet_model, tmp_path):
    roots = _trees(tmp_path / "data")
    summary = run_eval("robustness", encoder=imagenet_model, config=PROTOCOL, data="builtin:fashion-mnist",
                       out=tmp_path / "out", overrides=SMALL, sets="in-c,in-a,in-r,sketch,v2",
                       roots=[f"{k}={v}" for k, v in roots.items()])
    records = {r["protocol"]["set"]: r for r in summary["records"]}
    assert len(list((tmp_path / "out").glob("robustness-*.json"))) == 5
    # in-a / in-r: logits restricted to the 200 classes (class 0's larger bias left out), labels = the position in
    # the authors' list, not among the folders present
    assert records["in-a"]["metrics"]["top1"] == pytest.approx(50.0)
    assert records["in-r"]["metrics"]["top1"] == pytest.approx(50.0)
    assert records["sketch"]["metrics"]["top1"] == 0.0  # all 1000 logits: class 0 wins
    assert records["v2"]["metrics"]["top1"] == pytest.approx(100 / 13)  # class 0 wins: folder "0"'s image
    assert records["v2"]["dataset"]["layout"] == "integer"
    c = records["in-c"]["metrics"]
    assert c["mCE"] == pytest.approx(mce({k: [1.0] * 5 for k in ALEXNET_ERRORS}))  # class 0 wins: error 100 %
    assert c["ce"]["fog"] == pytest.approx(100.0 / ALEXNET_ERRORS["fog"]) and "speckle_noise" not in c["ce"]
    assert c["extra_error"] == {"speckle_noise": 100.0}
    assert records["in-c"]["protocol"]["transform"].startswith("centercrop32/")
    assert records["in-a"]["protocol"]["transform"].startswith("resize36-bicubic/centercrop32/")
    assert all(any("allow_subset" in d for d in r["protocol"]["deviations"]) for r in records.values())
    assert records["in-a"]["encoder"]["technique"] == "mae" and summary["metrics"]["in-a top1"] == 50.0
    assert all(r["hardware"]["precision_reason"] == "amp=none as set" for r in records.values())  # why, as elsewhere
    report = write_report(tmp_path / "out")
    assert "IN-C mCE (lower is better)" in report and "MAE Table 13" in report
    page = write_report(tmp_path / "out", fmt="html")  # the HTML page shows the same Table 13 layout
    layout = page.split("laid out as MAE Table 13")[1].split("</section>")[0]
    assert layout.count("<tr") == 2 + 5 and "IN-C mCE" in layout  # two header rows (columns, index name), 5 sets


def test_auto_precision_weighs_the_classifiers_encoder(imagenet_model, tmp_path, monkeypatch):
    """A fine-tuned model is no encoder file: the precision rule reads the workload of the encoder it holds."""
    from mimbench import fastpath

    monkeypatch.delenv("MIMBENCH_CPU_BF16", raising=False)
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16", "amx_bf16"}))
    summary = run_eval("robustness", encoder=imagenet_model, config=PROTOCOL, data="builtin:fashion-mnist",
                       out=tmp_path / "out", overrides=[*SMALL, "runtime.amp=auto"], sets="sketch",
                       roots=[f"sketch={_trees(tmp_path / 'data')['sketch']}"])
    reason = summary["records"][0]["hardware"]["precision_reason"]
    assert reason.startswith("auto: CPU kind amx, inference, 32-d x 2, 17 tokens")  # not "workload not given"


def test_the_restriction_and_integer_mapping_change_the_score(imagenet_model, tmp_path):
    """The same trees with a head where class 0 does not dominate: V2 folder "10" (2 images) is class 10."""
    from mimbench.evals.classifier import load_classifier, read_classifier_metadata

    model = load_classifier(imagenet_model)
    with torch.no_grad():
        model.head.bias[0] = 0.0
    meta = read_classifier_metadata(imagenet_model)
    save_classifier(model, tmp_path / "ft" / MODEL_FILE, record=meta["provenance"],
                    encoder_metadata=meta["encoder_metadata"], model_kwargs=meta["model_kwargs"], img_size=32,
                    classes=meta["classes"], mean=meta["mean"], std=meta["std"], data=meta["data"], eval_transform="")
    roots = _trees(tmp_path / "data")
    summary = run_eval("robustness", encoder=tmp_path / "ft", config=PROTOCOL, data=str(tmp_path / "data"),
                       out=tmp_path / "out", overrides=SMALL, sets="v2,sketch,in-c",
                       roots=[f"v2={roots['v2']}", f"sketch={roots['sketch']}", f"in-c={roots['in-c']}"])
    records = {r["protocol"]["set"]: r for r in summary["records"]}
    assert records["v2"]["metrics"]["top1"] == pytest.approx(100 * 2 / 13)  # string order: 1 / 13
    assert records["sketch"]["metrics"]["top1"] == pytest.approx(100 / 3)
    assert records["in-c"]["metrics"]["mCE"] == pytest.approx(mce({k: [0.5] * 5 for k in ALEXNET_ERRORS}))
    # a severity missing: the rest evaluated, the gap listed, no mCE
    shutil.rmtree(roots["in-c"] / "fog" / "3")
    partial = run_eval("robustness", encoder=tmp_path / "ft", config=PROTOCOL, data=str(tmp_path / "data"),
                       out=tmp_path / "partial", overrides=SMALL, sets="in-c",
                       roots=[f"in-c={roots['in-c']}"])["records"][0]
    assert "mCE" not in partial["metrics"] and partial["dataset"]["missing"] == ["fog/3"]
    assert len(partial["metrics"]["ce"]) == 14 and set(partial["metrics"]["error"]["fog"]) == {"1", "2", "4", "5"}


def test_bad_input_is_refused_before_any_work(imagenet_model, tmp_path):
    fmnist = tmp_path / "fm"
    model = build_model(imagenet_model.parent / "enc.safetensors", 10, img_size=32, drop_path=0.0)
    save_classifier(model, fmnist / MODEL_FILE, record={}, encoder_metadata=model.mimbench_metadata,
                    model_kwargs={"global_pool": "avg", "fc_norm": True, "num_classes": 10}, img_size=32,
                    classes=FASHION_MNIST_CLASSES, mean=(0.5,) * 3, std=(0.5,) * 3, data="builtin:fashion-mnist",
                    eval_transform="")
    _jpegs(tmp_path / "a" / imagenet_wnids()[6], 1)
    common = dict(config=PROTOCOL, data="builtin:fashion-mnist", out=tmp_path / "out", overrides=SMALL)
    with pytest.raises(MimbenchError, match="10 classes .* are not the 1000 ImageNet-1k classes"):
        run_eval("robustness", encoder=fmnist, sets="in-a", roots=[f"in-a={tmp_path / 'a'}"], **common)
    with pytest.raises(MimbenchError, match="No root for ImageNet-R"):
        run_eval("robustness", encoder=imagenet_model, sets="in-r", **common)
    with pytest.raises(MimbenchError, match="Unknown robustness set"):
        run_eval("robustness", encoder=imagenet_model, sets="in-x", **common)
    with pytest.raises(MimbenchError, match="not SET=PATH"):
        run_eval("robustness", encoder=imagenet_model, sets="in-a", roots=["/data/imagenet-a"], **common)
    with pytest.raises(MimbenchError, match="No fine-tuned model"):
        run_eval("robustness", encoder=tmp_path, sets="in-a", **common)
    assert not list((tmp_path / "out").glob("robustness-*.json"))


def test_fashion_mnist_c_mce_against_a_reference(tiny_encoder, tmp_path):
    data = build_fashion_mnist_c(tmp_path / "fmnist-c", n=16)
    first = np.load(data / "fashion-mnist-c.npz")["corrupted"]
    assert first.shape == (11, 5, 16, 32, 32, 3)
    assert np.array_equal(np.load(build_fashion_mnist_c(tmp_path / "again", n=16) / "fashion-mnist-c.npz")["corrupted"],
                          first)  # the noise draws are seeded
    models = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(tiny_encoder, 10, img_size=32, drop_path=0.0, head_init_std=1.0)
        models[seed] = save_classifier(model, tmp_path / f"ft{seed}" / MODEL_FILE, record={"run_id": str(seed), "encoder": ENCODER},
                                       encoder_metadata=model.mimbench_metadata,
                                       model_kwargs={"global_pool": "avg", "fc_norm": True, "num_classes": 10},
                                       img_size=32, classes=FASHION_MNIST_CLASSES, mean=(0.2860,) * 3,
                                       std=(0.3530,) * 3, data="builtin:fashion-mnist", eval_transform="")
    own = run_eval("robustness", encoder=models[0], config=DEMO, data=str(data), out=tmp_path / "o0",
                   overrides=["runtime.amp=none"], reference=models[0].parent)["records"][0]
    assert own["metrics"]["mCE"] == pytest.approx(100.0)  # its own normaliser
    other = run_eval("robustness", encoder=models[1], config=DEMO, data=str(data), out=tmp_path / "o1",
                     overrides=["runtime.amp=none"], reference=models[0])["records"][0]
    ref = own["metrics"]["error"]
    expected = np.mean([100 * np.mean(other["metrics"]["error"][c]) / np.mean(ref[c]) for c in ref])
    assert other["metrics"]["mCE"] == pytest.approx(expected)
    assert other["protocol"]["inputs"]["reference"] == own["protocol"]["inputs"]["model"]
    assert other["dataset"]["name"] == "fashion-mnist-c" and other["dataset"]["sizes"] == {"val": 16}


def test_the_cli_takes_the_model_sets_and_roots(imagenet_model, tmp_path):
    a_root = tmp_path / "a"
    _jpegs(a_root / imagenet_wnids()[CLASS_SUBSETS["in-a"][5]], 2)
    help_text = CliRunner().invoke(app, ["eval", "robustness", "--help"], terminal_width=200).output
    assert "--model" in help_text and "--root" in help_text and "--sets" in help_text
    result = CliRunner().invoke(app, ["eval", "robustness", "--model", str(imagenet_model), "--sets", "in-a", "--root",
                                      f"in-a={a_root}", "--out", str(tmp_path / "o"),
                                      *sum((["--set", s] for s in SMALL), [])])
    assert result.exit_code == 0, result.output
    assert "robustness: in-a top1=100" in result.output


def test_the_demo_runs_robustness_after_every_fine_tune_with_the_control_as_reference(tmp_path):
    from mimbench.demo import CONTROL, QUICK, demo_steps
    from mimbench.evals.tasks import all_tasks
    from mimbench.steps import Evaluate

    steps = [s for s in demo_steps(tmp_path, QUICK, {t.name: t.default_data for t in all_tasks()})
             if isinstance(s, Evaluate)]
    robust = [i for i, s in enumerate(steps) if s.task == "robustness"]
    finetunes = [i for i, s in enumerate(steps) if s.task == "finetune"]
    assert len(robust) == len(finetunes) == 3 and max(finetunes) < min(robust)
    for i in robust:
        assert steps[i].needs == ((steps[i].encoder, "finetune"), (CONTROL, "finetune"))
        assert "data.limit_val=200" in steps[i].overrides
    assert steps[finetunes[0]].needs == ()


def test_a_robustness_record_is_reused_only_for_the_same_models(imagenet_model, tmp_path):
    from mimbench.encoders import encoder_sha256
    from mimbench.steps import made_from

    sha = encoder_sha256(imagenet_model / MODEL_FILE)
    record = {"protocol": {"inputs": {"model": sha, "reference": sha}}}
    assert made_from(record, {"model": imagenet_model, "reference": imagenet_model})
    assert not made_from({"protocol": {"inputs": {"model": "0" * 64}}}, {"model": imagenet_model})
    assert made_from({"protocol": {}}, {})


def test_a_fine_tune_without_its_saved_model_is_not_reused(tmp_path):
    """A demo folder from before the fine-tune kept its model: the fine-tune step is redone for robustness to read."""
    from mimbench.steps import Evaluate, StepRunner

    step = Evaluate("mae", "finetune", Path("eval_configs/demo/finetune_fmnist.py"))
    assert StepRunner._lacks_model(step, tmp_path)
    (tmp_path / MODEL_FILE).write_bytes(b"")
    assert not StepRunner._lacks_model(step, tmp_path)
    assert not StepRunner._lacks_model(Evaluate("mae", "knn", Path("eval_configs/demo/knn_fmnist.py")), tmp_path / "x")
