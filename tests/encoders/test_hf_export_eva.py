"""Export to Hugging Face of the Eva family: a DINOv3-style encoder -> DINOv3ViTModel, which transformers' AutoModel
loads with the encoder's tokens and pooled feature, and which load_encoder reads back to the same encoder (both
directions within 1e-5, fp32, CPU); an EVA-02-style encoder has no transformers class and is refused."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from mimbench.encoders import convert_checkpoint, load_encoder, read_metadata
from mimbench.errors import MimbenchError
from mimbench.export import export

transformers = pytest.importorskip("transformers")  # optional: the reference implementation of DINOv3ViTModel

TOL = dict(rtol=1e-5, atol=1e-5)
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0)


def _encoder(tmp_path, name: str, **kw):
    """A perturbed tiny timm Eva of ``name``, converted to an encoder file; returns its path."""
    torch.manual_seed(0)
    model = timm.create_model(name, **(TINY | kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    return convert_checkpoint(tmp_path / "w.pth", tmp_path / "enc.safetensors")


@pytest.mark.parametrize("name,kw", [("vit_small_patch16_dinov3", {}), ("vit_small_patch16_dinov3_qkvb", {}),
                                     ("vit_small_plus_patch16_dinov3", {}),  # SwiGLU, gate and value apart
                                     ("vit_small_plus_patch16_dinov3", dict(swiglu_align_to=0))])  # packed fc1
def test_dinov3_export_loads_in_transformers_and_back(tmp_path, name, kw):
    enc = _encoder(tmp_path, name, **kw)
    meta = read_metadata(enc)
    assert meta["swiglu_mlp"] == ("true" if "plus" in name else "false")
    export(enc, "hf", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["DINOv3ViTModel"]
    assert config["use_gated_mlp"] == (read_metadata(enc)["swiglu_mlp"] == "true")
    theirs = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "DINOv3ViTModel"
    assert read_metadata(tmp_path / "hf")["source_layout"] == "hf-dinov3"
    for size in (32, 48):  # the rotary grid is recomputed at any size, on both sides
        mine, back = load_encoder(enc, img_size=size), load_encoder(tmp_path / "hf", img_size=size)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            tokens, out = mine.forward_features(x), theirs(pixel_values=x)
            torch.testing.assert_close(out.last_hidden_state, tokens, **TOL)
            torch.testing.assert_close(out.pooler_output, mine(x), **TOL)
            torch.testing.assert_close(back.forward_features(x), tokens, **TOL)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "DINOv3ViTModel" in card and "pooler_output" in card


def test_eva02_export_is_refused_naming_why(tmp_path):
    enc = _encoder(tmp_path, "eva02_tiny_patch14_224", patch_size=14, img_size=28)
    with pytest.raises(MimbenchError, match="No transformers class.*'cat'.*absolute pos_embed") as err:
        export(enc, "hf", tmp_path / "hf")
    assert "--to timm" in err.value.fix
    assert not (tmp_path / "hf" / "model.safetensors").exists()
