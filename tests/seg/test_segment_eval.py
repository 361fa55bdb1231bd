import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mimbench.seg  # noqa: F401
from mimbench.errors import MimbenchError

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "eval_configs" / "segmentation" / "demo_fmnist_seg.py"


def _encoder(tmp_path):
    from mimbench.encoders import save_encoder

    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                            depth=4, num_heads=2, num_classes=0)
    return save_encoder(vit.state_dict(), tmp_path / "enc.safetensors", arch="vit-d32x4/8", img_size=32,
                        patch_size=8, embed_dim=32, depth=4, num_heads=2, technique="mae"), vit


def _data(root, n_train=4, n_val=2):
    rng = np.random.default_rng(0)
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "images" / split / f"{i}.jpg")
            Image.fromarray(rng.integers(0, 11, (64, 64), dtype=np.uint8)).save(root / "annotations" / split / f"{i}.png")
    return root


def test_backbone_checkpoint_loads_through_mmseg_pretrained_init(tmp_path):
    from mmseg.models.backbones import MAE

    from mimbench.seg.backbone import write_backbone_checkpoint

    enc, vit = _encoder(tmp_path)
    ckpt, fields = write_backbone_checkpoint(enc, tmp_path / "bb.pth", img_size=64)
    assert fields == dict(patch_size=8, embed_dims=32, num_layers=4, num_heads=2, mlp_ratio=4, img_size=(64, 64))
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

    enc, _ = _encoder(tmp_path)
    data = _data(tmp_path / "fmseg")
    out = tmp_path / "run"
    record = run_segment(encoder=enc, config=DEMO, data=str(data), out=out,
                         overrides=["train_cfg.max_iters=2", "train_dataloader.batch_size=2"])
    assert record["task"] == "segment" and record["seed"] == 0
    assert 0.0 <= record["metrics"]["mIoU"] <= 100.0 and "aAcc" in record["metrics"]
    assert any("num_layers: 12 -> 4" in d for d in record["protocol"]["deviations"])
    written = list(out.glob("*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["run_id"] == record["run_id"]


def test_run_segment_refuses_bad_layout(tmp_path):
    from mimbench.evals.segment import run_segment

    enc, _ = _encoder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MimbenchError, match="ADE20K-layout"):
        run_segment(encoder=enc, config=DEMO, data=str(tmp_path / "empty"), out=tmp_path / "run")


def test_builtin_data_needs_the_fashion_mnist_seg_config(tmp_path):
    from mimbench.evals.segment import run_segment

    enc, _ = _encoder(tmp_path)
    ade = REPO / "eval_configs" / "segmentation" / "upernet_vit-b_ade20k_512x512_160k.py"
    with pytest.raises(MimbenchError, match="FashionMNISTSegDataset"):
        run_segment(encoder=enc, config=ade, data="builtin:fashion-mnist-seg", out=tmp_path / "run")
