"""Eva-family encoders (DINOv3, EVA-02) as mmseg backbones: the same blocks, registers and class token dropped from
the feature maps, rotary grid at the crop, layer decay numbered as for a ViT, and `eval segment` end to end."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import mimbench.seg  # noqa: F401  (mmcv.ops fallback before mmseg; registers the backbone)
from mimbench.encoders import convert_checkpoint, convert_state, load_encoder
from mimbench.seg.backbone import encoder_to_backbone, write_backbone_checkpoint
from mimbench.testing import write_seg_tree

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "eval_configs" / "segmentation" / "demo_fmnist_seg.py"
TINY = dict(patch_size=8, embed_dim=64, depth=3, num_heads=1, num_classes=0)


def _checkpoint(tmp_path: Path, name: str, img_size: int = 32, **kw) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=img_size, **(TINY | kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    torch.save(model.state_dict(), tmp_path / f"{name}.pth")
    return tmp_path / f"{name}.pth"


def _backbone(fields: dict, converted: dict, out_indices=(0, 2)):
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    net = MODELS.build(dict(fields, out_indices=list(out_indices)))
    assert set(dict(net.named_parameters())) == set(converted)  # every weight has its place, nothing else
    net.load_state_dict(converted, strict=True)
    net.eval()
    return net


@pytest.mark.parametrize("name,kw,crop", [("vit_small_patch16_dinov3_qkvb", {}, 48),
                                          ("eva02_base_patch14_224", dict(patch_size=14), 42)])
def test_eva_backbone_block_outputs_equal_the_encoders(name, kw, crop, tmp_path):
    src = _checkpoint(tmp_path, name, img_size=32 if not kw else 28, **kw)
    state, meta = convert_state(src)
    fields, converted = encoder_to_backbone(state, meta, img_size=crop)
    assert fields["type"] == "MAEStyleEva" and fields["eva"]["rope_type"] == meta["rope_type"]
    assert not any(k.startswith(("norm.", "fc_norm.", "blocks.")) for k in converted)
    net = _backbone(fields, converted)
    encoder = load_encoder(src, img_size=crop)  # the encoder at the crop: rotary grid recomputed, pos_embed resampled
    x = torch.randn(2, 3, crop, crop)
    grid = crop // int(meta["patch_size"])
    with torch.no_grad():
        outs = net(x)
        tokens = encoder.patch_embed(x)
        tokens, rope = encoder._pos_embed(tokens)
        want = []
        for block in encoder.blocks:
            tokens = block(tokens, rope=rope)
            patches = tokens[:, encoder.num_prefix_tokens:]  # class token and registers dropped
            want.append(patches.transpose(1, 2).reshape(2, -1, grid, grid))
    assert len(outs) == 2 and outs[0].shape == (2, 64, grid, grid)
    torch.testing.assert_close(outs[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1], want[2], rtol=1e-5, atol=1e-5)


def test_eva_backbone_layer_decay_puts_registers_with_the_embeddings(tmp_path):
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    state, meta = convert_state(_checkpoint(tmp_path, "vit_small_patch16_dinov3"))
    fields, _ = encoder_to_backbone(state, meta, img_size=32)
    init_default_scope("mmseg")
    model = MODELS.build(dict(type="EncoderDecoder", backbone=dict(fields, out_indices=[2]),
                              decode_head=dict(type="FCNHead", in_channels=64, in_index=0, channels=8, num_convs=1,
                                               num_classes=3, norm_cfg=dict(type="BN", requires_grad=True))))
    cfg = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=0.1, weight_decay=0.05),
               constructor="MimLayerDecayOptimizerConstructor", paramwise_cfg=dict(num_layers=3, layer_decay_rate=0.5))
    groups = build_optim_wrapper(model, cfg).optimizer.param_groups
    owner = {id(p): g for g in groups for p in g["params"]}
    assert len(owner) == sum(len(g["params"]) for g in groups)  # no parameter twice
    setting = {n: (owner[id(p)]["weight_decay"], owner[id(p)]["lr_scale"]) for n, p in model.named_parameters()}
    assert setting["backbone.reg_token"] == setting["backbone.cls_token"] == (0.0, pytest.approx(0.5 ** 4))
    assert setting["backbone.patch_embed.proj.weight"] == (0.05, pytest.approx(0.5 ** 4))
    assert setting["backbone.layers.2.attn.qkv.weight"] == (0.05, pytest.approx(0.5))
    assert setting["backbone.layers.0.gamma_1"] == (0.0, pytest.approx(0.5 ** 3))


def test_eva_backbone_checkpoint_loads_through_mmseg_pretrained_init(tmp_path):
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    enc = convert_checkpoint(_checkpoint(tmp_path, "vit_small_patch16_dinov3"), tmp_path / "d.safetensors")
    path, fields = write_backbone_checkpoint(enc, tmp_path / "backbone.pth", img_size=32)
    init_default_scope("mmseg")
    net = MODELS.build(dict(fields, out_indices=[2], init_cfg=dict(type="Pretrained", checkpoint=str(path))))
    net.init_weights()
    saved = torch.load(path, weights_only=True)["state_dict"]
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)


def test_run_segment_on_a_dinov3_encoder(tmp_path):
    from mimbench.evals.segment import run_segment

    src = _checkpoint(tmp_path, "vit_small_patch16_dinov3", depth=4)
    record = run_segment(encoder=src, config=DEMO, data=str(write_seg_tree(tmp_path / "fmseg", n_val=2,
                                                                            sizes=[(64, 64)])),
                         out=tmp_path / "run", overrides=["train_cfg.max_iters=2", "train_dataloader.batch_size=2"],
                         aug_test=False)
    assert record["task"] == "segment" and record["encoder"]["family"] == "eva"
    assert 0.0 <= record["metrics"]["mIoU"] <= 100.0
    assert any("MAEStyleEva" in d for d in record["protocol"]["deviations"])
