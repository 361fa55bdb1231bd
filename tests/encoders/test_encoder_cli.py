"""`mimbench convert` and `mimbench info` end to end on a small ViT."""
from __future__ import annotations

import re
from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from mimbench.cli import app
from mimbench.encoders import load_encoder

runner = CliRunner()


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_convert_then_info(tmp_path):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=3,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    src, dst = tmp_path / "vit.pth", tmp_path / "enc.safetensors"
    torch.save({"model": vit.state_dict()}, src)
    result = runner.invoke(app, ["convert", str(src), str(dst), "--layout", "timm"])
    assert result.exit_code == 0, result.output
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_encoder(dst)(x), vit.forward_features(x)[:, 0])
    info = runner.invoke(app, ["info", str(dst)])
    out = _plain(info.output)
    assert info.exit_code == 0 and "vit-d64x2/8" in out and "source_dropped  head(2)" in out
    n = sum(p.numel() for n_, p in vit.named_parameters() if not n_.startswith("head."))
    assert f"({n:,})" in out


def test_info_on_a_checkpoint_is_a_user_error(tmp_path):
    src = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(2)}, src)
    result = runner.invoke(app, ["info", str(src)])  # read as a checkpoint, which it is not
    assert result.exit_code == 2 and "does not look like a ViT" in _plain(result.output)
    bad = runner.invoke(app, ["convert", str(src), str(tmp_path / "e.safetensors")])
    assert bad.exit_code == 2 and "does not look like a ViT" in _plain(bad.output)
