"""Fixtures of the multi-process tests."""
import pytest


@pytest.fixture(scope="session")
def dist_encoder(tmp_path_factory):
    """A random-init ViT (embed 32, depth 4, 2 heads, patch 8, 32x32) saved as an encoder file; depth 4
    is the least the segmentation configs tap (4 blocks)."""
    from functools import partial

    import timm.models.vision_transformer as tvit
    import torch

    from mimbench.encoders import save_encoder

    torch.manual_seed(0)
    vit = tvit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4.0,
                                 num_classes=0, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    path = tmp_path_factory.mktemp("enc") / "tiny.safetensors"
    save_encoder(vit.state_dict(), path, arch="vit-test/8", img_size=32, patch_size=8, embed_dim=32, depth=4,
                 num_heads=2, technique="random-init")
    return path
