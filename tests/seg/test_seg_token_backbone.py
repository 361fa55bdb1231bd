"""Segmentation on ViT-family encoders mmseg's MAE backbone cannot hold -- DINOv2 with registers, I-JEPA without a
class token -- through ``MAEStyleViT``, which runs the encoder's own timm blocks: tapped outputs equal the encoder's
block outputs (patch tokens, within 1e-5), the position grid moves by the encoder's rule, registers go to layer 0
of the layer decay with no weight decay, and run_segment runs end to end at test size."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mimbench.seg  # noqa: F401  (mmcv.ops fallback before mmseg; registers the backbone)
from mimbench.encoders import open_encoder, save_encoder
from mimbench.encoders.vit import vit_metadata
from mimbench.seg.backbone import backbone_cfg_from_metadata, encoder_to_backbone, write_backbone_checkpoint
from mimbench.testing import perturb, tiny_vit, write_seg_tree

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "eval_configs" / "segmentation" / "demo_fmnist_seg.py"
IMG, PATCH, D, DEPTH, HEADS = 32, 8, 32, 4, 2
FLAGS = {
    "dinov2-reg4": {"init_values": 1e-5, "reg_tokens": 4, "no_embed_class": True, "pos_resample": "dinov2-reg"},
    "ijepa": {"class_token": False, "global_pool": "avg"},
}
NUM_LAYERS, RATE, BASE_LR, WD = DEPTH, 0.65, 0.1, 0.05


def _encoder(tmp_path, case: str):
    """A perturbed timm ViT with the case's flags (4 blocks, as the segmentation configs tap), saved; (vit, path)."""
    flags = FLAGS[case]
    vit = perturb(tiny_vit(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, flags=flags))
    path = save_encoder(vit.state_dict(), tmp_path / f"{case}.safetensors", arch="vit-d32x4/8", img_size=IMG,
                        patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, technique="test",
                        extra=vit_metadata(flags))
    return vit, path


def _backbone(fields: dict, ckpt=None, out_indices=(0, 1, 2, 3)):
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    cfg = dict(fields, out_indices=list(out_indices), init_values=1.0)
    if ckpt is not None:
        cfg["init_cfg"] = dict(type="Pretrained", checkpoint=str(ckpt))
    model = MODELS.build(cfg)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("case", list(FLAGS))
def test_tapped_outputs_are_the_encoders_own_block_outputs(tmp_path, case):
    vit, enc = _encoder(tmp_path, case)
    ckpt, fields = write_backbone_checkpoint(enc, tmp_path / "bb.pth", img_size=IMG)
    assert fields["type"] == "MAEStyleViT"
    assert fields["tokens"]["reg_tokens"] == FLAGS[case].get("reg_tokens", 0)
    backbone = _backbone(fields, ckpt)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outs = backbone(x)
        tokens = vit._pos_embed(vit.patch_embed(x))
        want = []
        for block in vit.blocks:
            tokens = block(tokens)
            want.append(tokens[:, vit.num_prefix_tokens:])  # class token and registers dropped
    assert len(outs) == DEPTH
    for out, w in zip(outs, want):
        assert out.shape == (2, D, IMG // PATCH, IMG // PATCH)
        assert (out.flatten(2).transpose(1, 2) - w).abs().max().item() < 1e-5


def test_position_grid_moves_by_the_encoders_rule(tmp_path):
    vit, enc = _encoder(tmp_path, "dinov2-reg4")
    state, meta = open_encoder(enc)
    _, converted = encoder_to_backbone(state, meta, img_size=2 * IMG)  # 4x4 -> 8x8 patch grid
    grid = vit.pos_embed.detach().reshape(1, 4, 4, D).permute(0, 3, 1, 2)  # no_embed_class: no prefix slots
    want = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)  # DINOv2-reg
    assert torch.allclose(converted["pos_embed"], want.permute(0, 2, 3, 1).reshape(1, 64, D), atol=1e-6)
    assert torch.equal(converted["reg_token"], vit.reg_token.detach())
    backbone = _backbone(backbone_cfg_from_metadata(meta, 2 * IMG))
    backbone.load_state_dict(converted, strict=True)  # the backbone at the crop holds exactly these tensors
    assert backbone(torch.randn(1, 3, 2 * IMG, 2 * IMG))[0].shape == (1, D, 8, 8)


def test_registers_land_in_layer_0_without_weight_decay(tmp_path):
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    _, enc = _encoder(tmp_path, "dinov2-reg4")
    fields = backbone_cfg_from_metadata(open_encoder(enc)[1], IMG)
    init_default_scope("mmseg")
    model = MODELS.build(dict(
        type="EncoderDecoder", backbone=dict(fields, out_indices=[1, 3]),
        decode_head=dict(type="FCNHead", in_channels=D, in_index=1, channels=8, num_convs=1, num_classes=3,
                         norm_cfg=dict(type="BN", requires_grad=True))))
    cfg = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=BASE_LR, betas=(0.9, 0.999), weight_decay=WD),
               constructor="MimLayerDecayOptimizerConstructor",
               paramwise_cfg=dict(num_layers=NUM_LAYERS, layer_decay_rate=RATE))
    optimizer = build_optim_wrapper(model, cfg).optimizer
    owner = {id(p): (g["weight_decay"], g["lr_scale"]) for g in optimizer.param_groups for p in g["params"]}
    settings = {name: owner[id(p)] for name, p in model.named_parameters()}
    layer0 = RATE ** (NUM_LAYERS + 1)  # mmseg: decay_rate ** (num_layers + 2 - 0 - 1)
    assert settings["backbone.reg_token"] == (0.0, pytest.approx(layer0))
    assert settings["backbone.cls_token"] == (0.0, pytest.approx(layer0))
    assert settings["backbone.pos_embed"] == (0.0, pytest.approx(layer0))
    assert settings["backbone.patch_embed.proj.weight"] == (WD, pytest.approx(layer0))
    assert settings["backbone.layers.0.attn.qkv.weight"] == (WD, pytest.approx(RATE ** NUM_LAYERS))
    assert settings["backbone.layers.3.ls1.gamma"] == (0.0, pytest.approx(RATE))  # 1-D: no decay, block 3
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(settings)


@pytest.mark.parametrize("case", list(FLAGS))
def test_run_segment_runs_end_to_end(tmp_path, case):
    from mimbench.evals.segment import run_segment

    _, enc = _encoder(tmp_path, case)
    data = write_seg_tree(tmp_path / "fmseg", n=2, n_val=1, sizes=[(32, 32)])
    record = run_segment(encoder=enc, config=DEMO, data=str(data), out=tmp_path / "run",
                         overrides=["train_cfg.max_iters=2", "train_dataloader.batch_size=2"], aug_test=False)
    assert record["task"] == "segment" and 0.0 <= record["metrics"]["mIoU"] <= 100.0
    assert any("MAE -> MAEStyleViT" in d for d in record["protocol"]["deviations"])
