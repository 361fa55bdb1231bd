"""The shipped ImageNet protocol configs, end to end on a small ImageFolder tree of real image files.

Only size / epoch / batch (and worker-count) overrides are applied, so the protocol data path runs as users
run it: JPEG decode, greyscale / CMYK / RGBA conversion, timm RandomResizedCrop + RandAugment + random
erasing, Mixup/CutMix, LARS, layer decay, and the Resize + CenterCrop evaluation transform.
"""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimbench.evals import run_eval

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("n01440764", "n01443537", "n01484850", "n01491361")
SMALL = ["img_size=32", "schedule.epochs=2", "schedule.warmup_epochs=1", "data.num_workers=0", "runtime.progress=False"]


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
    """ImageNet layout, 4 classes x (12 train, 5 val) images of varied sizes and modes, class-dependent colour."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    modes = ("RGB", "RGB", "L", "CMYK", "RGBA")
    for split, n in (("train", 12), ("val", 5)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(36, 80)), int(rng.integers(36, 80))
                base = np.zeros((h, w, 3), np.uint8)
                base[..., c % 3] = 200
                noise = rng.integers(0, 55, (h, w, 3), dtype=np.uint8)
                img = Image.fromarray(base + noise, "RGB").convert(modes[i % len(modes)])
                if img.mode == "RGBA":
                    img.save(folder / f"{name}_{i}.png")
                else:
                    img.save(folder / f"{name}_{i}.JPEG", quality=90)
    return root


def _one_record(out: Path) -> dict:
    records = [p for p in out.glob("*.json")]
    assert len(records) == 1, records
    return json.loads(records[0].read_text())


@pytest.mark.slow
@pytest.mark.parametrize("size", ["b", "l", "h"])
def test_finetune_protocol_on_jpeg_tree(tiny_encoder, jpeg_tree, tmp_path, size):
    config = REPO / "eval_configs" / "finetune" / f"mae_vit-{size}_in1k.py"
    workers = ["data.num_workers=2"] if size == "b" else []  # one run decodes and augments in worker processes
    record = run_eval("finetune", encoder=tiny_encoder, config=config, data=str(jpeg_tree), out=tmp_path,
                      overrides=SMALL + ["optim.batch_size=8", "optim.eff_batch_size=16"] + workers)
    assert record["status"] == "ok"
    assert record["dataset"]["sizes"] == {"train": 48, "val": 20}
    assert 0.0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 100.0
    assert np.isfinite(record["metrics"]["train_loss"])
    tf = record["protocol"]["train_transform"]
    assert "rand-m9-mstd0.5-inc1" in tf or "RandAugment" in tf
    assert "RandomErasing" in tf and "torgb" in tf
    assert record["protocol"]["val_transform"].startswith("resize36-bicubic/centercrop32")
    # only the size/epoch/batch overrides: nothing else departs from the protocol
    assert record["protocol"]["deviations"] == []
    assert _one_record(tmp_path)["run_id"] == record["run_id"]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["mae_vit-b_in1k", "mae_vit-l_in1k", "mae_vit-h_in1k", "fast_cached"])
def test_linear_protocol_on_jpeg_tree(tiny_encoder, jpeg_tree, tmp_path, config):
    path = REPO / "eval_configs" / "linear" / f"{config}.py"
    record = run_eval("linear", encoder=tiny_encoder, config=path, data=str(jpeg_tree), out=tmp_path,
                      overrides=SMALL + ["optim.batch_size=8", "optim.eff_batch_size=16", "feature_batch_size=16"])
    assert record["protocol"]["mode"] == ("cached" if config == "fast_cached" else "protocol")
    assert record["dataset"]["sizes"] == {"train": 48, "val": 20}
    assert 0.0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 100.0
    assert record["protocol"]["optimizer"] == "lars"
    if config == "fast_cached":
        assert record["protocol"]["deviations"] == ["fast linear probe on cached features"]
    else:
        assert record["protocol"]["deviations"] == []
        assert record["protocol"]["train_transform"].startswith("randomresizedcrop32")
    assert _one_record(tmp_path)["run_id"] == record["run_id"]


@pytest.mark.parametrize("config,preset", [("cae_vit-b_in1k", "cae"), ("ep_vit-b_in1k", "ep"),
                                           ("vjepa_vit-l_in1k", "vjepa")])
def test_attentive_protocol_on_jpeg_tree(tiny_encoder, jpeg_tree, tmp_path, config, preset):
    path = REPO / "eval_configs" / "attentive" / f"{config}.py"
    record = run_eval("attentive", encoder=tiny_encoder, config=path, data=str(jpeg_tree), out=tmp_path,
                      overrides=SMALL + ["optim.batch_size=8", "optim.eff_batch_size=16"])
    protocol = record["protocol"]
    # EP reports its best epoch, selected on a held-out 10 % of the 48 training images (5, never trained on); the
    # other presets report the last epoch and train on all 48
    sizes = {"train": 43, "val": 20, "holdout": 5} if preset == "ep" else {"train": 48, "val": 20}
    assert record["status"] == "ok" and record["dataset"]["sizes"] == sizes
    assert protocol["reported_epoch"] == ("selected" if preset == "ep" else "last")
    if preset == "ep":
        assert protocol["selection"]["on"] == "train-holdout" and protocol["selection"]["holdout_images"] == 5
        assert sorted(protocol["selection"]["per_epoch"]) == ["1", "2"]
    assert 0.0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 100.0
    assert np.isfinite(record["metrics"]["train_loss"])
    assert protocol["head_preset"] == preset and protocol["head_params"] > 0 and protocol["deviations"] == []
    # the tiny encoder: 32x32 at patch 8 = 16 patch tokens and a class token
    assert protocol["tokens"] == {"cae": "all 17 tokens (class/register tokens: 1) after the final norm",
                                  "ep": "16 patch tokens of the last block before the final norm; class token and "
                                        "registers (1) excluded",
                                  "vjepa": "16 patch tokens after the final norm; class token and registers (1) "
                                           "excluded"}[preset]
    tf = protocol["train_transform"]
    assert ("RandomErasing" in tf and "AutoAugment" in tf) if preset == "vjepa" else tf.startswith("randomresizedcrop32")
    assert protocol["val_transform"].startswith("resize36-bicubic/centercrop32")
    assert _one_record(tmp_path)["run_id"] == record["run_id"]


def test_knn_protocol_on_jpeg_tree(tiny_encoder, jpeg_tree, tmp_path):
    record = run_eval("knn", encoder=tiny_encoder, config=REPO / "eval_configs" / "knn" / "dino_k20.py",
                      data=str(jpeg_tree), out=tmp_path, overrides=["img_size=32", "data.num_workers=0"])
    assert record["dataset"]["sizes"]["train"] == 48 and record["dataset"]["sizes"]["val"] == 20
    assert 0.0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 100.0
    assert _one_record(tmp_path)["run_id"] == record["run_id"]


def test_eval_resize_follows_mae_build_transform():
    """MAE main_finetune: crop_pct 224/256 up to 224 (int truncation), 1.0 above."""
    from mimbench.evals.features import eval_resize

    assert [eval_resize(s) for s in (32, 224, 256, 384, 448)] == [36, 256, 256, 384, 448]
