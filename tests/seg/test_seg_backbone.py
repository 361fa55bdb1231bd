import pytest
import timm
import torch

import mimbench.seg  # noqa: F401
from mimbench.errors import MimbenchError
from mimbench.seg.backbone import timm_to_mmseg_mae


def _pair(img_size=32, seg_size=32):
    from mmseg.models.backbones import MAE

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=img_size, patch_size=8, embed_dim=32, depth=3,
        num_heads=2, num_classes=0,
    ).eval()
    mae = MAE(img_size=seg_size, patch_size=8, embed_dims=32, num_layers=3, num_heads=2, mlp_ratio=4,
              out_indices=[0, 2], init_values=1.0, norm_cfg=dict(type="LN", eps=1e-6))
    mae.init_weights()  # relative position bias tables start at zero, as for fine-tuning
    mae.eval()  # mmseg backbones' train() returns None, so no chaining
    return vit, mae


def test_converted_backbone_reproduces_timm_block_outputs():
    vit, mae = _pair()
    sd = timm_to_mmseg_mae(vit.state_dict())
    missing, unexpected = mae.load_state_dict(sd, strict=False)
    assert unexpected == []
    assert all("relative_position" in k or "gamma" in k for k in missing)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = mae(x)
        tokens = vit.patch_embed(x)
        tokens = vit._pos_embed(tokens)
        feats = []
        for block in vit.blocks:
            tokens = block(tokens)
            feats.append(tokens[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4))
    assert torch.allclose(outs[0], feats[0], atol=1e-5)
    assert torch.allclose(outs[1], feats[2], atol=1e-5)


def test_position_embedding_resampled_to_segmentation_grid():
    vit, mae = _pair(img_size=32, seg_size=64)
    sd = timm_to_mmseg_mae(vit.state_dict(), grid=(8, 8))
    assert sd["pos_embed"].shape == (1, 65, 32)
    assert torch.equal(sd["pos_embed"][:, 0], vit.pos_embed[:, 0].detach())  # class token untouched
    mae.load_state_dict(sd, strict=False)


def test_unknown_tensors_are_refused():
    with pytest.raises(MimbenchError, match="no counterpart"):
        timm_to_mmseg_mae({"cls_token": torch.zeros(1, 1, 4), "head.weight": torch.zeros(2, 4)})


# ---------------------------------------------------------------- BEiT encoders, resampling to the crop grid
def _beit(**kw):
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_classes=0,
                global_pool="token")
    args.update(kw)
    model = timm.create_model("beit_base_patch16_224", **args).eval()
    with torch.no_grad():  # non-trivial tables, gammas and biases
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _beit_encoder(model):
    from mimbench.encoders.beit import beit_metadata
    from mimbench.encoders.file import encoder_metadata

    flags = dict(use_abs_pos_emb=model.pos_embed is not None, use_rel_pos_bias=model.rel_pos_bias is None,
                 use_shared_rel_pos_bias=model.rel_pos_bias is not None,
                 layer_scale_init_value=0.1 if model.blocks[0].gamma_1 is not None else 0.0)
    meta = encoder_metadata(arch="t", img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, technique="beit",
                            family="beit", extra=beit_metadata(flags))
    return dict(model.state_dict()), meta


def _mmseg_backbone(fields, converted):
    from mmseg.models import backbones

    fields = dict(fields)
    cls = getattr(backbones, fields.pop("type"))
    net = cls(**fields, out_indices=[0, 1, 2], init_values=1.0, drop_path_rate=0.0)
    result = net.load_state_dict(converted, strict=False)
    assert result.unexpected_keys == []
    assert all(k.endswith("relative_position_index") for k in result.missing_keys)
    net.eval()
    return net


def _timm_block_outputs(model, x):
    grid = x.shape[-1] // 8
    with torch.no_grad():
        tokens = model.patch_embed(x)
        tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], dim=1)
        if model.pos_embed is not None:
            tokens = tokens + model.pos_embed
        shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None
        outs = []
        for blk in model.blocks:
            tokens = blk(tokens, shared_rel_pos_bias=shared)
            outs.append(tokens[:, 1:].transpose(1, 2).reshape(len(x), -1, grid, grid))
    return outs


@pytest.mark.parametrize("variant", [
    dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False),  # BEiT / data2vec pre-training: shared table
    dict(),  # per-block tables (BEiT v2, fine-tuned BEiT)
    dict(use_abs_pos_emb=True, init_values=0.0),  # absolute embeddings and tables, no layer scale -> mmseg MAE
])
def test_beit_encoder_block_outputs_equal_in_mmseg(variant):
    from mimbench.seg.backbone import encoder_to_backbone

    model = _beit(**variant)
    state, meta = _beit_encoder(model)
    fields, converted = encoder_to_backbone(state, meta, img_size=32)
    assert fields["type"] == ("MAE" if variant.get("use_abs_pos_emb") else "BEiT")
    net = _mmseg_backbone(fields, converted)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = net(x)
    for got, want in zip(outs, _timm_block_outputs(model, x)):
        assert torch.allclose(got, want, atol=1e-5)


def test_vit_encoder_block_outputs_equal_in_mmseg_through_the_checked_writer():
    from mimbench.encoders.file import encoder_metadata
    from mimbench.seg.backbone import encoder_to_backbone

    vit, _ = _pair()
    meta = encoder_metadata(arch="t", img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, technique="mae")
    fields, converted = encoder_to_backbone(dict(vit.state_dict()), meta, img_size=32)
    net = _mmseg_backbone(fields, converted)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = net(x)
        tokens = vit._pos_embed(vit.patch_embed(x))
        for i, block in enumerate(vit.blocks):
            tokens = block(tokens)
            assert torch.allclose(outs[i], tokens[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4), atol=1e-5)


def test_segmentation_pos_embed_is_plain_bicubic():
    """14x14 -> 32x32 as for a 224 encoder at the 512 crop: plain bicubic (MAE/mmseg), not timm's antialiased default."""
    from timm.layers import resample_abs_pos_embed

    from mimbench.encoders.file import encoder_metadata
    from mimbench.seg.backbone import encoder_to_backbone

    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=224, patch_size=16, embed_dim=32,
                            depth=1, num_heads=2, num_classes=0)
    with torch.no_grad():
        vit.pos_embed.normal_()
    meta = encoder_metadata(arch="t", img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, technique="mae")
    _, converted = encoder_to_backbone(dict(vit.state_dict()), meta, img_size=512)
    pos = vit.pos_embed.detach()
    grid = pos[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    plain = torch.nn.functional.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False)
    plain = torch.cat([pos[:, :1], plain.permute(0, 2, 3, 1).reshape(1, 1024, 32)], dim=1)
    assert converted["pos_embed"].shape == (1, 1025, 32)
    assert torch.allclose(converted["pos_embed"], plain, atol=1e-6)
    antialiased = resample_abs_pos_embed(pos, new_size=[32, 32], num_prefix_tokens=1)
    assert (antialiased - plain).norm() / plain.norm() > 0.01  # the kernel the protocol does not use


def test_relative_tables_resized_as_beit_and_mmseg():
    """Geometric-progression resize: offsets 0 and +-1 land on source samples, the 3 class entries are kept."""
    from mimbench.encoders.resample import resize_rel_pos_table
    from mimbench.seg.backbone import encoder_to_backbone

    model = _beit()
    state, meta = _beit_encoder(model)
    fields, converted = encoder_to_backbone(state, meta, img_size=64)  # 4x4 -> 8x8 patch grid
    net = _mmseg_backbone(fields, converted)
    table = model.blocks[1].attn.relative_position_bias_table.detach()
    resized = converted["layers.1.attn.relative_position_bias_table"]
    assert resized.shape == (15 * 15 + 3, 2) and torch.equal(resized, resize_rel_pos_table(table, 8))
    assert torch.equal(resized[-3:], table[-3:])
    old, new = table[:-3].reshape(7, 7, 2), resized[:-3].reshape(15, 15, 2)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            assert torch.allclose(new[7 + dy, 7 + dx], old[3 + dy, 3 + dx], atol=1e-5)
    with torch.no_grad():
        assert [o.shape for o in net(torch.randn(1, 3, 64, 64))] == [(1, 64, 8, 8)] * 3
