"""Segmentation's ViT backbone and the ViT family's DINOv2 variants: layer scale and DINOv2's position resampling
carried into mmseg's MAE backbone; encoders with registers or without class token refused by name."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import mimbench.seg  # noqa: F401
from mimbench.encoders import convert_checkpoint, open_encoder
from mimbench.errors import MimbenchError
from mimbench.seg.backbone import vit_to_mmseg


def _dinov2_file(tmp_path, name):
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, img_size=28, embed_dim=32, depth=2, num_heads=2,
                            num_classes=0).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    torch.save(vit.state_dict(), tmp_path / "d.pth")
    return vit, convert_checkpoint(tmp_path / "d.pth", tmp_path / "d.safetensors", num_heads=2)


def test_dinov2_layer_scale_reaches_the_mmseg_backbone(tmp_path):
    from mmseg.models.backbones import MAE

    vit, enc = _dinov2_file(tmp_path, "vit_small_patch14_dinov2")
    state, meta = open_encoder(enc)
    kind, weights = vit_to_mmseg(state, meta, (2, 2))
    mae = MAE(img_size=28, patch_size=14, embed_dims=32, num_layers=2, num_heads=2, mlp_ratio=4, out_indices=[1],
              init_values=1.0, norm_cfg=dict(type="LN", eps=1e-6))
    assert kind == "MAE" and mae.load_state_dict(weights, strict=False).unexpected_keys == []
    mae.load_state_dict(weights, strict=False)
    mae.eval()
    assert torch.equal(weights["layers.0.gamma_1"], vit.blocks[0].ls1.gamma.detach())
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        (out,) = mae(x)
        tokens = vit.blocks(vit._pos_embed(vit.patch_embed(x)))
    assert torch.allclose(out, tokens[:, 1:].transpose(1, 2).reshape(2, 32, 2, 2), atol=1e-5)
    # at the crop size the grid moves by DINOv2's rule (scale factor (g + 0.1) / M, no antialias)
    _, big = vit_to_mmseg(state, meta, (4, 4))
    grid = vit.pos_embed.detach()[:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(4.1 / 2, 4.1 / 2), mode="bicubic", antialias=False)
    assert torch.allclose(big["pos_embed"][:, 1:], want.permute(0, 2, 3, 1).reshape(1, 16, 32), atol=1e-6)


def test_registers_are_refused_by_the_mmseg_backbone(tmp_path):
    _, enc = _dinov2_file(tmp_path, "vit_small_patch14_reg4_dinov2")
    state, meta = open_encoder(enc)
    with pytest.raises(MimbenchError, match="4 register tokens"):
        vit_to_mmseg(state, meta, (2, 2))
