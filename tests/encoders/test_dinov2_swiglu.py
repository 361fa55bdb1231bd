"""DINOv2 giant's SwiGLU MLP in the ViT family (``swiglu_mlp``): timm ``vit_giant_patch14_dinov2``, the official
``mlp.w12/w3`` names and transformers' ``Dinov2Model(use_swiglu_ffn=True)``, tiny (depth 2, width 64) with the giant
model's hidden-size rule, give their own features after loading (fp32, CPU, within 1e-5)."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from mimbench.encoders import convert_checkpoint, load_encoder, read_metadata
from mimbench.encoders.dinov2 import hf_dinov2_state, swiglu_width
from mimbench.errors import MimbenchError
from mimbench.export import export

transformers = pytest.importorskip("transformers")  # optional: the reference implementation of Dinov2Model

TOL = dict(rtol=1e-5, atol=1e-5)
D, IMG = 64, 28


def _perturbed(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _x():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))


def _timm_giant():
    # timm's giant uses mlp_ratio 2.66667 * 2, i.e. 2h / D at D = 1536; at D = 64 that ratio gives an odd fc1 width,
    # so the tiny model takes 2h / D of DINOv2's rule h = ceil8(int(4D * 2/3)) (176 at D = 64) directly
    torch.manual_seed(0)
    return _perturbed(timm.create_model("vit_giant_patch14_dinov2", img_size=IMG, embed_dim=D, depth=2, num_heads=1,
                                        mlp_ratio=2 * swiglu_width(D) / D, num_classes=0))


def test_the_hidden_size_rule_is_the_giant_models():
    assert swiglu_width(1536) == 4096 == int(1536 * 2.66667 * 2) // 2  # official / HF rule = timm's ratio at 1536
    assert swiglu_width(D) == 176


def _official(sd: dict) -> dict:
    out = {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v for k, v in sd.items()}
    return out | {"mask_token": torch.zeros(1, D)}


@pytest.mark.parametrize("names", ["timm", "official"])
def test_timm_and_official_giant_state_dicts_give_timms_features(tmp_path, names):
    model = _timm_giant()
    sd = model.state_dict() if names == "timm" else _official(model.state_dict())
    torch.save(sd, tmp_path / "g.pth")
    enc_file = convert_checkpoint(tmp_path / "g.pth", tmp_path / "g.safetensors")
    meta = read_metadata(enc_file)
    assert (meta["source_layout"], meta["swiglu_mlp"], meta["mlp_ratio"]) == ("dinov2", "true", "5.5")
    enc = load_encoder(enc_file)
    assert type(enc.blocks[0].mlp).__name__ == "GluMlp" and isinstance(enc.blocks[0].mlp.act, torch.nn.SiLU)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), model.forward_features(x), **TOL)
        torch.testing.assert_close(enc(x), model(x), **TOL)


def _hf():
    config = transformers.Dinov2Config(hidden_size=D, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4,
                                       patch_size=14, image_size=IMG, use_swiglu_ffn=True)
    torch.manual_seed(0)
    return _perturbed(transformers.Dinov2Model(config))


def test_hf_dinov2_with_swiglu_gives_transformers_features(tmp_path):
    model = _hf()
    model.save_pretrained(tmp_path / "hf")
    x = _x()
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state
    enc = load_encoder(tmp_path / "hf")
    assert enc.mimbench_metadata["swiglu_mlp"] == "true"
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), want, **TOL)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    # transformers 5's in-memory names (gate_proj / up_proj / down_proj) map to the same tensors as the saved ones
    saved, _ = hf_dinov2_state(load_file(str(tmp_path / "hf" / "model.safetensors")), config)
    in_memory, _ = hf_dinov2_state(model.state_dict(), config)
    assert saved.keys() == in_memory.keys() and all(torch.equal(saved[k], in_memory[k]) for k in saved)
    with pytest.raises(MimbenchError, match="use_swiglu_ffn=False but the weights hold a SwiGLU MLP"):
        hf_dinov2_state(model.state_dict(), config | {"use_swiglu_ffn": False})


def test_swiglu_encoder_exports_to_dinov2model_and_not_to_mae(tmp_path):
    model = _timm_giant()
    torch.save(model.state_dict(), tmp_path / "g.pth")
    enc_file = convert_checkpoint(tmp_path / "g.pth", tmp_path / "g.safetensors")
    with pytest.raises(MimbenchError, match="swiglu_mlp"):
        export(enc_file, "mae", tmp_path / "mae.pth")
    export(enc_file, "hf", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["architectures"], config["use_swiglu_ffn"], config["mlp_ratio"]) == (["Dinov2Model"], True, 4)
    theirs = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=x).last_hidden_state, model.forward_features(x), **TOL)
        torch.testing.assert_close(load_encoder(tmp_path / "hf").forward_features(x), model.forward_features(x), **TOL)


def test_segmentation_backbone_runs_the_swiglu_blocks(tmp_path):
    import mimbench.seg  # noqa: F401  (heavy, optional: mmseg; registers the backbone)
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    from mimbench.seg.backbone import write_backbone_checkpoint

    model = _timm_giant()
    torch.save(model.state_dict(), tmp_path / "g.pth")
    enc_file = convert_checkpoint(tmp_path / "g.pth", tmp_path / "g.safetensors")
    ckpt, fields = write_backbone_checkpoint(enc_file, tmp_path / "bb.pth", img_size=IMG)
    assert fields["type"] == "MAEStyleViT" and fields["tokens"]["swiglu_mlp"] is True
    init_default_scope("mmseg")
    backbone = MODELS.build(dict(fields, out_indices=[0, 1], init_values=1.0,
                                 init_cfg=dict(type="Pretrained", checkpoint=str(ckpt))))
    backbone.init_weights()
    x = _x()
    with torch.no_grad():
        outs = backbone.eval()(x)
        tokens = model._pos_embed(model.patch_embed(x))
        for out, block in zip(outs, model.blocks):
            tokens = block(tokens)
            torch.testing.assert_close(out.flatten(2).transpose(1, 2), tokens[:, 1:], **TOL)
