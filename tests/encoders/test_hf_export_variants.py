"""Export to Hugging Face of the ViT family's DINOv2- and I-JEPA-style encoders: layer scale and/or register tokens
-> Dinov2Model / Dinov2WithRegistersModel, no class token -> IJepaModel. Both directions within 1e-5 (fp32, CPU):
transformers' AutoModel on the exported folder gives the encoder's tokens, and load_encoder on that folder gives
the encoder's features back."""
from __future__ import annotations

import json

import pytest
import torch

from mimbench.encoders import load_encoder, read_metadata, save_encoder
from mimbench.encoders.vit import vit_metadata
from mimbench.errors import MimbenchError
from mimbench.evals.features import pool_tokens, resolve_pool
from mimbench.export import export
from mimbench.testing import perturb, tiny_vit

transformers = pytest.importorskip("transformers")  # optional: the reference implementation of these classes

TOL = 1e-5
IMG, PATCH, D, DEPTH, HEADS = 28, 14, 32, 2, 2
#: encoder flags -> the transformers class the export must write
CASES = {
    "dinov2": ({"init_values": 1e-5, "pos_resample": "dinov2"}, "Dinov2Model"),
    "dinov2-reg4": ({"init_values": 1e-5, "reg_tokens": 4, "no_embed_class": True, "pos_resample": "dinov2-reg"},
                    "Dinov2WithRegistersModel"),
    # registers with position slots of their own and no layer scale (timm's reg_tokens without no_embed_class)
    "reg2-embedded": ({"reg_tokens": 2}, "Dinov2WithRegistersModel"),
    "ijepa": ({"class_token": False, "global_pool": "avg"}, "IJepaModel"),
}


def _encoder(tmp_path, flags: dict, name: str = "enc"):
    """A perturbed timm ViT with these ViT-family flags, saved as an encoder file; returns (path, flags)."""
    vit = perturb(tiny_vit(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, flags=flags))
    return save_encoder(vit.state_dict(), tmp_path / f"{name}.safetensors", arch="vit-d32x2/14", img_size=IMG,
                        patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, technique="test",
                        extra=vit_metadata(flags))


def _x():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))


def _pooled(enc, x):
    with torch.no_grad():
        return pool_tokens(enc, enc.forward_features(x), resolve_pool("auto", enc.mimbench_metadata))


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers_and_back_with_the_same_features(tmp_path, case):
    flags, cls = CASES[case]
    enc = _encoder(tmp_path, flags)
    mine = load_encoder(enc)
    export(enc, "hf", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [cls] and config["image_size"] == IMG  # the encoder's own size
    theirs = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == cls
    x = _x()
    with torch.no_grad():
        want, got = mine.forward_features(x), theirs(pixel_values=x).last_hidden_state
    # every token in order: class token, registers, patches (I-JEPA: patches only)
    assert got.shape == want.shape and (got - want).abs().max().item() < TOL, (got - want).abs().max()
    back = load_encoder(tmp_path / "hf")  # and back again: the folder reads as the same encoder
    assert read_metadata(tmp_path / "hf")["source_layout"] == {
        "Dinov2Model": "hf-dinov2", "Dinov2WithRegistersModel": "hf-dinov2-registers", "IJepaModel": "hf-ijepa"}[cls]
    assert back.num_prefix_tokens == mine.num_prefix_tokens
    assert (_pooled(back, x) - _pooled(mine, x)).abs().max().item() < TOL
    with torch.no_grad():
        assert (back.forward_features(x) - want).abs().max().item() < TOL
    card = (tmp_path / "hf" / "README.md").read_text()
    assert cls in card and f"own image size, {IMG}x{IMG}" in card


def test_registers_and_layer_scale_land_where_transformers_reads_them(tmp_path):
    from safetensors.torch import load_file

    enc = _encoder(tmp_path, CASES["reg2-embedded"][0])
    export(enc, "hf", tmp_path / "hf")
    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    mine = load_encoder(enc)
    # registers keep the position slots they had (folded in), the class slot stays in position_embeddings
    assert torch.allclose(state["embeddings.register_tokens"],
                          (mine.reg_token + mine.pos_embed[:, 1:3]).detach(), atol=0)
    assert torch.equal(state["embeddings.position_embeddings"][:, 1:], mine.pos_embed[:, 3:].detach())
    assert torch.equal(state["encoder.layer.0.layer_scale1.lambda1"], torch.ones(D))  # no layer scale: identity


def test_ijepa_style_with_layer_scale_is_refused_before_writing(tmp_path):
    enc = _encoder(tmp_path, {"class_token": False, "global_pool": "avg", "init_values": 0.1})
    with pytest.raises(MimbenchError, match="IJepaModel cannot hold") as err:
        export(enc, "hf", tmp_path / "out")
    assert "init_values" in err.value.problem and "--to timm" in err.value.fix
    assert not (tmp_path / "out" / "model.safetensors").exists()
