"""The shipped ADE20K UperNet configs, end to end on a small ADE20K-layout tree of real JPEG/PNG files.

Only size / iteration / batch / worker overrides: the crop (512 -> 64, in every place the config spells it
out), the resize scales, 2 iterations at batch 2, no worker processes. Everything else -- UperNet + FCN
heads at their widths, layer-decay AdamW, warm-up + poly schedule, PhotoMetricDistortion, reduce_zero_label,
slide inference with the padded test windows -- runs as shipped.
"""
import json
from pathlib import Path

import pytest

import mimbench.seg  # noqa: F401
from mimbench.testing import write_seg_encoder, write_seg_tree

REPO = Path(__file__).resolve().parents[2]


def _size_overrides(crop: int) -> list[str]:
    c = f"({crop}, {crop})"
    return [f"crop_size={c}", f"model.data_preprocessor.size={c}", f"model.data_preprocessor.test_cfg.size={c}",
            f"model.test_cfg.crop_size={c}", f"model.test_cfg.stride=({crop * 2 // 3}, {crop * 2 // 3})",
            f"train_dataloader.dataset.pipeline.2.scale=({crop * 4}, {crop})",
            f"train_dataloader.dataset.pipeline.3.crop_size={c}",
            "train_cfg.max_iters=2", "train_dataloader.batch_size=2",
            "train_dataloader.num_workers=0", "train_dataloader.persistent_workers=False"] + [
        item for loader in ("val_dataloader", "test_dataloader")
        for item in (f"{loader}.dataset.pipeline.1.scale=({crop * 4}, {crop})", f"{loader}.num_workers=0",
                     f"{loader}.persistent_workers=False")]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["upernet_vit-b_ade20k_512x512_160k", "upernet_vit-l_ade20k_512x512_160k"])
def test_ade20k_protocol_on_small_tree(tmp_path, config):
    from mimbench.evals.segment import run_segment

    enc = write_seg_encoder(tmp_path / "enc.safetensors")
    # raw ADE20K labels: 0 = "other" (ignored through reduce_zero_label), 1..150 the classes
    data = write_seg_tree(tmp_path / "ADEChallengeData2016", n=4, n_val=2, sizes=[(112, 80), (96, 128)],
                          num_classes=151, name="ADE_{split}_{i:08d}", quality=90)
    out = tmp_path / "run"
    record = run_segment(encoder=enc, config=REPO / "eval_configs" / "segmentation" / f"{config}.py", data=str(data),
                         out=out, overrides=_size_overrides(64), aug_test=False)
    assert record["task"] == "segment" and record["status"] == "ok"
    m = record["metrics"]
    assert 0.0 <= m["mIoU"] <= 100.0 and 0.0 <= m["aAcc"] <= 100.0
    assert record["protocol"]["test_mode"] == "slide"
    # what differs from the file is only what the encoder and the CPU force, each recorded
    for d in record["protocol"]["deviations"]:
        assert d.startswith(("model.backbone.", "neck/head input widths", "optim_wrapper", "SyncBN -> BatchNorm")), d
    assert any(d.startswith("optim_wrapper: AmpOptimWrapper -> OptimWrapper") for d in record["protocol"]["deviations"])
    (written,) = list(out.glob("*.json"))
    assert json.loads(written.read_text())["run_id"] == record["run_id"]
