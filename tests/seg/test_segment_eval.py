import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mimbench.seg  # noqa: F401
from mimbench.errors import MimbenchError
from mimbench.testing import tiny_vit, write_seg_encoder, write_seg_tree

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "eval_configs" / "segmentation" / "demo_fmnist_seg.py"


def test_backbone_checkpoint_loads_through_mmseg_pretrained_init(tmp_path):
    from mmseg.models.backbones import MAE

    from mimbench.seg.backbone import write_backbone_checkpoint

    enc, vit = write_seg_encoder(tmp_path / "enc.safetensors"), tiny_vit(depth=4)
    ckpt, fields = write_backbone_checkpoint(enc, tmp_path / "bb.pth", img_size=64)
    assert fields == dict(patch_size=8, embed_dims=32, num_layers=4, num_heads=2, mlp_ratio=4, img_size=(64, 64),
                          type="MAE", norm_cfg=dict(type="LN", eps=1e-6))
    fields.pop("type")
    mae = MAE(**fields, out_indices=[3], init_values=1.0, init_cfg=dict(type="Pretrained", checkpoint=str(ckpt)))
    mae.init_weights()
    assert torch.equal(mae.layers[2].attn.qkv.weight, vit.blocks[2].attn.qkv.weight)
    assert torch.equal(mae.layers[3].ffn.layers[1].weight, vit.blocks[3].mlp.fc2.weight)
    assert mae.pos_embed.shape == (1, 65, 32)


def test_out_indices_scale_to_encoder_depth():
    from mimbench.evals.segment import scaled_out_indices

    assert scaled_out_indices([3, 5, 7, 11], 12, 12) == [3, 5, 7, 11]
    assert scaled_out_indices([3, 5, 7, 11], 12, 24) == [7, 11, 15, 23]
    assert scaled_out_indices([3, 5, 7, 11], 12, 4) == [0, 1, 2, 3]
    with pytest.raises(MimbenchError, match="too shallow"):
        scaled_out_indices([3, 5, 7, 11], 12, 2)


def test_run_segment_trains_tests_and_writes_record(tmp_path):
    from mimbench.evals.segment import run_segment

    enc = write_seg_encoder(tmp_path / "enc.safetensors")
    data = write_seg_tree(tmp_path / "fmseg", n_val=2, sizes=[(64, 64)])
    out = tmp_path / "run"
    record = run_segment(encoder=enc, config=DEMO, data=str(data), out=out,
                         overrides=["train_cfg.max_iters=2", "train_dataloader.batch_size=2"], aug_test=False)
    assert record["task"] == "segment" and record["seed"] == 0
    assert 0.0 <= record["metrics"]["mIoU"] <= 100.0 and "aAcc" in record["metrics"]
    per_class = record["metrics"]["per_class_iou"]
    assert set(per_class) <= set(mimbench.seg.FASHION_MNIST_SEG_CLASSES) and len(per_class) >= 2
    # mmseg's mIoU is the mean over the classes that occur: the per-class values must reproduce it
    assert abs(np.mean(list(per_class.values())) - record["metrics"]["mIoU"]) < 0.02
    assert "mIoU_ms" not in record["metrics"] and record["protocol"]["multi_scale_test"] is False
    assert any("num_layers: 12 -> 4" in d for d in record["protocol"]["deviations"])
    written = list(out.glob("*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["run_id"] == record["run_id"]


@pytest.mark.slow
def test_run_segment_on_an_official_beit_checkpoint(tmp_path):
    """A BEiT pre-training .pth (shared relative position bias) goes to mmseg's BEiT backbone, no convert step."""
    from mimbench.evals.segment import run_segment

    torch.manual_seed(0)
    beit = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                             depth=4, num_heads=1, num_classes=0, global_pool="token",
                             use_shared_rel_pos_bias=True, use_rel_pos_bias=False)
    src = tmp_path / "beit_pt.pth"
    torch.save({"model": dict(beit.state_dict(), mask_token=torch.zeros(1, 1, 64),
                              **{"lm_head.weight": torch.zeros(16, 64), "lm_head.bias": torch.zeros(16)})}, src)
    out = tmp_path / "run"
    record = run_segment(encoder=src, config=DEMO, data=str(write_seg_tree(tmp_path / "fmseg", n_val=2, sizes=[(64, 64)])), out=out,
                         overrides=["train_cfg.max_iters=2", "train_dataloader.batch_size=2"], aug_test=False)
    assert 0.0 <= record["metrics"]["mIoU"] <= 100.0
    assert record["encoder"]["layout"] == "beit" and record["encoder"]["family"] == "beit"
    assert any(d.startswith("model.backbone.type: MAE -> BEiT") for d in record["protocol"]["deviations"])
    weights = torch.load(out / "backbone_init.pth", weights_only=True)["state_dict"]
    table = beit.rel_pos_bias.relative_position_bias_table.detach()
    assert all(torch.equal(weights[f"layers.{i}.attn.relative_position_bias_table"], table) for i in range(4))


def test_run_segment_refuses_bad_layout(tmp_path):
    from mimbench.evals.segment import run_segment

    enc = write_seg_encoder(tmp_path / "enc.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MimbenchError, match="ADE20K-layout"):
        run_segment(encoder=enc, config=DEMO, data=str(tmp_path / "empty"), out=tmp_path / "run")


def test_builtin_data_needs_the_fashion_mnist_seg_config(tmp_path):
    from mimbench.evals.segment import run_segment

    enc = write_seg_encoder(tmp_path / "enc.safetensors")
    ade = REPO / "eval_configs" / "segmentation" / "upernet_vit-b_ade20k_512x512_160k.py"
    with pytest.raises(MimbenchError, match="FashionMNISTSegDataset"):
        run_segment(encoder=enc, config=ade, data="builtin:fashion-mnist-seg", out=tmp_path / "run")


def test_multi_scale_flip_and_sliding_window_test(tmp_path):
    """Slide mode over 40x48 images with 32x32 windows, then SegTTAModel over 3 scales x 2 flips.

    The MAE backbone only takes img_size inputs (its relative position tables are fixed), so
    windows and scaled images smaller than the crop must be padded by the data preprocessor
    (test_cfg size) -- without that the 0.5 scale fails with a size mismatch.
    """
    from mmseg.models.segmentors import EncoderDecoder

    from mimbench.evals.segment import run_segment

    calls = []
    original = EncoderDecoder.slide_inference

    def counting(self, inputs, batch_img_metas):
        calls.append(tuple(inputs.shape[-2:]))
        return original(self, inputs, batch_img_metas)

    enc = write_seg_encoder(tmp_path / "enc.safetensors")
    data = write_seg_tree(tmp_path / "fmseg", n_val=2, sizes=[(40, 48)])
    ratios = [0.5, 1.0, 1.5]
    config = tmp_path / "three_scales.py"  # the demo config with 3 of its 6 test scales, to keep the test short
    config.write_text(
        f"_base_ = [{str(DEMO)!r}]\n"
        "tta_pipeline = [dict(type='LoadImageFromFile'), dict(type='TestTimeAug', transforms=["
        f"[dict(type='Resize', scale_factor=r, keep_ratio=True) for r in {ratios}], "
        "[dict(type='RandomFlip', prob=0.0, direction='horizontal'), "
        "dict(type='RandomFlip', prob=1.0, direction='horizontal')], "
        "[dict(type='LoadAnnotations')], [dict(type='PackSegInputs')]])]\n")
    overrides = ["train_cfg.max_iters=1", "train_dataloader.batch_size=2",
                 "test_dataloader.dataset.pipeline.1.keep_ratio=True",
                 "test_dataloader.dataset.pipeline.1.scale=(48, 40)"]
    EncoderDecoder.slide_inference = counting
    try:
        record = run_segment(encoder=enc, config=config, data=str(data), out=tmp_path / "run", overrides=overrides)
    finally:
        EncoderDecoder.slide_inference = original
    m = record["metrics"]
    assert record["protocol"]["test_mode"] == "slide" and record["protocol"]["multi_scale_test"] is True
    for key in ("mIoU", "mIoU_ms", "aAcc_ms", "mAcc_ms"):
        assert 0.0 <= m[key] <= 100.0, key
    # single scale: 2 images at 40x48; multi-scale: 2 images x 3 scales x 2 flips
    assert len(calls) == 2 + 2 * len(ratios) * 2
    assert calls[:2] == [(40, 48)] * 2
    # 0.5 scale (20x24) padded up to the 32x32 window; 1.5 scale 60x72 slides over several windows
    assert (32, 32) in calls[2:] and (60, 72) in calls[2:]


def test_labels_outside_the_classes_are_refused_before_training(tmp_path):
    from mimbench.evals.segment import run_segment

    enc = write_seg_encoder(tmp_path / "enc.safetensors")
    data = write_seg_tree(tmp_path / "fmseg", n_val=2, sizes=[(64, 64)])
    bad = np.zeros((64, 64), dtype=np.uint8)
    bad[0, :3] = [11, 40, 255]  # 11 classes: 11 and 40 are out of range; 255 is the ignore label
    Image.fromarray(bad).save(data / "annotations" / "validation" / "1.png")
    with pytest.raises(MimbenchError, match=r"1 annotation map\(s\) of test hold labels above 10") as err:
        run_segment(encoder=enc, config=DEMO, data=str(data), out=tmp_path / "run")
    assert "1.png (labels [11, 40])" in str(err.value.problem)
    assert not (tmp_path / "run" / "mmseg").exists()  # refused before the Runner was built


def test_label_check_follows_reduce_zero_label(tmp_path):
    """ADE20K layout: 150 classes with reduce_zero_label, so raw labels 0..150 and 255 are valid, 151 is not."""
    from mmengine.config import Config

    from mimbench.evals.segment import check_labels

    ade = Config.fromfile(str(REPO / "eval_configs" / "segmentation" / "upernet_vit-b_ade20k_512x512_160k.py"))
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "images" / split / "a.jpg")
        Image.fromarray(np.array([[0, 150, 255]] * 3, dtype=np.uint8)).save(root / "annotations" / split / "a.png")
    for name in ("train_dataloader", "test_dataloader"):
        ade[name].dataset.data_root = str(root)
    assert check_labels(ade) == {"train": 1, "test": 1}
    Image.fromarray(np.array([[151]], dtype=np.uint8)).save(root / "annotations" / "training" / "a.png")
    with pytest.raises(MimbenchError, match="above 150"):
        check_labels(ade)


def test_sync_bn_config_runs_in_one_process_and_says_so(tmp_path):
    from mimbench.evals.segment import run_segment

    enc = write_seg_encoder(tmp_path / "enc.safetensors")
    data = write_seg_tree(tmp_path / "fmseg", n_val=2, sizes=[(64, 64)])
    sync = [f"model.{part}.norm_cfg.type=SyncBN" for part in ("neck", "decode_head", "auxiliary_head")]
    record = run_segment(encoder=enc, config=DEMO, data=str(data), out=tmp_path / "run",
                         overrides=["train_cfg.max_iters=1", "train_dataloader.batch_size=2", *sync])
    assert any(d.startswith("SyncBN -> BatchNorm") for d in record["protocol"]["deviations"])
    assert 0.0 <= record["metrics"]["mIoU"] <= 100.0


def test_aug_test_needs_a_tta_pipeline(tmp_path):
    from mimbench.evals.segment import run_segment

    enc = write_seg_encoder(tmp_path / "enc.safetensors")
    data = write_seg_tree(tmp_path / "fmseg", n_val=2, sizes=[(64, 64)])
    no_tta = tmp_path / "no_tta.py"
    no_tta.write_text(f"_base_ = [{str(DEMO)!r}]\ntta_model = None\ntta_pipeline = None\n")
    with pytest.raises(MimbenchError, match="no tta_model"):
        run_segment(encoder=enc, config=no_tta, data=str(data), out=tmp_path / "run", aug_test=True)


def test_cli_segment_no_aug_test(tmp_path):
    from typer.testing import CliRunner

    from mimbench.cli import app

    enc = write_seg_encoder(tmp_path / "enc.safetensors")
    data = write_seg_tree(tmp_path / "fmseg", n_val=2, sizes=[(64, 64)])
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "segment", "--encoder", str(enc), "--config", str(DEMO), "--data",
                                      str(data), "--out", str(out), "--set", "train_cfg.max_iters=1",
                                      "--set", "train_dataloader.batch_size=2", "--no-aug-test"])
    assert result.exit_code == 0, result.output
    assert "'mIoU':" in result.output and "per_class_iou" not in result.output and "mIoU_ms" not in result.output
    (record,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert record["protocol"]["multi_scale_test"] is False and "background" in record["metrics"]["per_class_iou"]


def test_shorter_run_moves_the_poly_decay_end():
    from mmengine.config import Config

    from mimbench.config import load_config
    from mimbench.evals.segment import follow_max_iters

    ade = REPO / "eval_configs" / "segmentation" / "upernet_vit-b_ade20k_512x512_160k.py"
    cfg = load_config(ade, ["train_cfg.max_iters=8000"])
    assert follow_max_iters(cfg, ["train_cfg.max_iters=8000"]) == [
        "param_scheduler PolyLR end: 160000 -> 8000 (follows train_cfg.max_iters)"]
    assert [s.end for s in cfg.param_scheduler] == [1500, 8000]
    untouched = Config.fromfile(str(ade))
    assert follow_max_iters(untouched, []) == [] and untouched.param_scheduler[1].end == 160000
    explicit = ["train_cfg.max_iters=8000", "param_scheduler.1.end=4000"]
    cfg = load_config(ade, explicit)
    assert follow_max_iters(cfg, explicit) == [] and cfg.param_scheduler[1].end == 4000
    inside_warmup = load_config(ade, ["train_cfg.max_iters=1000"])  # ends before PolyLR begins at 1500
    assert follow_max_iters(inside_warmup, ["train_cfg.max_iters=1000"]) == []
    assert inside_warmup.param_scheduler[1].end == 160000
