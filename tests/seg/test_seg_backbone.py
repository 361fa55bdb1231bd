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
