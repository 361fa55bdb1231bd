"""Conversion of foreign checkpoints (official MAE, timm, DeiT) into encoder files."""
from __future__ import annotations

import argparse
import hashlib
from functools import partial

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from mimbench.encoders import convert_checkpoint, load_encoder, read_metadata, save_encoder
from mimbench.encoders.arch import default_num_heads
from mimbench.errors import MimbenchError


class NotAWeight:
    """A custom class: unpickling it needs code import, which weights_only loading forbids."""

    def __init__(self):
        self.x = 1


def tiny_vit(num_classes=0, embed_dim=32, num_heads=2, **kw):
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=4, embed_dim=embed_dim, depth=2, num_heads=num_heads,
                          num_classes=num_classes, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def encoder_keys(sd):
    return {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}


def same_outputs(model, path):
    loaded = load_encoder(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return torch.equal(model.forward_features(x), loaded.forward_features(x))


def mae_checkpoint(model):
    """An official-MAE-style pre-training checkpoint: encoder + decoder + mask token, training args, epoch."""
    sd = dict(model.state_dict())
    sd.update({
        "mask_token": torch.zeros(1, 1, 16),
        "decoder_embed.weight": torch.zeros(16, 32), "decoder_embed.bias": torch.zeros(16),
        "decoder_pos_embed": torch.zeros(1, 65, 16),
        "decoder_blocks.0.norm1.weight": torch.ones(16), "decoder_blocks.0.attn.qkv.weight": torch.zeros(48, 16),
        "decoder_norm.weight": torch.ones(16), "decoder_norm.bias": torch.zeros(16),
        "decoder_pred.weight": torch.zeros(48, 16), "decoder_pred.bias": torch.zeros(48),
    })
    return {"model": sd, "epoch": 399, "args": argparse.Namespace(model="mae_vit_tiny", mask_ratio=0.75),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}}


def test_plain_timm_state_dict_converts_and_loads_strictly(tmp_path):
    model = tiny_vit(num_classes=10)
    src = tmp_path / "vit.pth"
    torch.save(model.state_dict(), src)
    dst = convert_checkpoint(src, tmp_path / "enc.safetensors", num_heads=2)
    meta = read_metadata(dst)
    assert meta["source_layout"] == "timm" and meta["source"] == "vit.pth"
    assert meta["source_dropped"] == "head(2)"
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (meta["embed_dim"], meta["depth"], meta["num_heads"], meta["patch_size"], meta["img_size"]) == (
        "32", "2", "2", "4", "32")
    assert same_outputs(model, dst)


def test_pickled_custom_object_is_refused(tmp_path):
    src = tmp_path / "evil.pth"
    torch.save({"model": tiny_vit().state_dict(), "extra": NotAWeight()}, src)
    dst = tmp_path / "enc.safetensors"
    with pytest.raises(MimbenchError, match="refused for safety") as e:
        convert_checkpoint(src, dst)
    assert "weights only" in str(e.value) or "weights_only" in str(e.value)
    assert not dst.exists()


def test_mae_pretraining_checkpoint_drops_decoder(tmp_path):
    model = tiny_vit()
    src = tmp_path / "checkpoint-399.pth"
    torch.save(mae_checkpoint(model), src)
    dst = convert_checkpoint(src, tmp_path / "mae.safetensors", num_heads=2)  # auto-detected from the decoder keys
    meta = read_metadata(dst)
    assert meta["source_layout"] == "mae" and meta["technique"] == "mae"
    assert float(meta["epochs"]) == 400.0  # MAE's saved epoch counts from 0
    assert meta["source_dropped"] == ("decoder_blocks(2),decoder_embed(2),decoder_norm(2),decoder_pos_embed(1),"
                                      "decoder_pred(2),mask_token(1)")
    from safetensors import safe_open

    with safe_open(str(dst), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.state_dict())
    assert same_outputs(model, dst)


def test_explicit_layout_and_wrappers(tmp_path):
    model = tiny_vit()
    src = tmp_path / "ddp.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, src)
    dst = convert_checkpoint(src, tmp_path / "e.safetensors", layout="deit", num_heads=2, technique="supervised",
                             data="imagenet-1k")
    meta = read_metadata(dst)
    assert (meta["source_layout"], meta["technique"], meta["data"]) == ("deit", "supervised", "imagenet-1k")
    assert same_outputs(model, dst)
    with pytest.raises(MimbenchError, match="Unknown checkpoint layout"):
        convert_checkpoint(src, tmp_path / "f.safetensors", layout="beit9", num_heads=2)


def test_mae_finetuned_checkpoint(tmp_path):
    pooled = tiny_vit(num_classes=10, global_pool="avg")  # fc_norm instead of norm, as MAE fine-tuning saves
    src = tmp_path / "mae_finetuned.pth"
    torch.save({"model": pooled.state_dict()}, src)
    with pytest.raises(MimbenchError, match="global average pooling"):
        convert_checkpoint(src, tmp_path / "e.safetensors", layout="mae", num_heads=2)
    both = tiny_vit(num_classes=10, global_pool="avg", fc_norm=False)
    sd = dict(both.state_dict())
    sd["fc_norm.weight"], sd["fc_norm.bias"] = torch.ones(32), torch.zeros(32)
    torch.save({"model": sd}, src)
    dst = convert_checkpoint(src, tmp_path / "e.safetensors", layout="mae", num_heads=2)
    assert read_metadata(dst)["source_dropped"] == "fc_norm(2),head(2)"
    assert same_outputs(both, dst)


def test_distilled_deit_refused(tmp_path):
    sd = dict(tiny_vit().state_dict())
    sd["dist_token"] = torch.zeros(1, 1, 32)
    sd["head_dist.weight"] = torch.zeros(10, 32)
    src = tmp_path / "deit_distilled.pth"
    torch.save({"model": sd}, src)
    with pytest.raises(MimbenchError, match="distilled DeiT"):
        convert_checkpoint(src, tmp_path / "e.safetensors", num_heads=2)


def test_safetensors_source_and_encoder_file_refused(tmp_path):
    model = tiny_vit()
    src = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src)
    dst = convert_checkpoint(src, tmp_path / "enc.safetensors", num_heads=2)
    assert same_outputs(model, dst)
    with pytest.raises(MimbenchError, match="already a mimbench encoder"):
        convert_checkpoint(dst, tmp_path / "again.safetensors", num_heads=2)


def test_head_count_table_and_override(tmp_path):
    assert default_num_heads(768, 12) == 12 and default_num_heads(1024, 24) == 16
    assert default_num_heads(1280, 32) == 16  # ViT-H: 80-dim heads, not 1280 // 64
    assert default_num_heads(128, 6) == 2 and default_num_heads(48, 2) is None
    model = tiny_vit(embed_dim=48, num_heads=3)
    src = tmp_path / "w48.pth"
    torch.save(model.state_dict(), src)
    with pytest.raises(MimbenchError, match="num_heads"):
        convert_checkpoint(src, tmp_path / "e.safetensors")
    dst = convert_checkpoint(src, tmp_path / "e.safetensors", num_heads=3)
    assert read_metadata(dst)["num_heads"] == "3"
    assert same_outputs(model, dst)
    model = tiny_vit(embed_dim=64, num_heads=1)  # 64-dim heads inferred for a non-standard width
    torch.save(model.state_dict(), src)
    dst = convert_checkpoint(src, tmp_path / "e64.safetensors")
    assert read_metadata(dst)["num_heads"] == "1" and read_metadata(dst)["arch"] == "vit-d64x2/4"
    assert same_outputs(model, dst)


def test_non_vit_and_corrupt_sources(tmp_path):
    src = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, src)
    with pytest.raises(MimbenchError, match="does not look like a ViT"):
        convert_checkpoint(src, tmp_path / "e.safetensors", num_heads=2)
    sd = dict(tiny_vit().state_dict())
    sd["pos_embed"] = sd["pos_embed"][:, 1:]  # no class position (timm no_embed_class)
    torch.save(sd, src)
    with pytest.raises(MimbenchError, match="without a class position"):
        convert_checkpoint(src, tmp_path / "e.safetensors", num_heads=2)
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(MimbenchError, match="cannot be read"):
        convert_checkpoint(bad, tmp_path / "e.safetensors", num_heads=2)
    with pytest.raises(MimbenchError, match="does not exist"):
        convert_checkpoint(tmp_path / "absent.pth", tmp_path / "e.safetensors", num_heads=2)


def test_converted_matches_native_export(tmp_path):
    # A checkpoint converted from the timm layout and one exported natively hold the same tensors.
    model = tiny_vit()
    native = save_encoder(model.state_dict(), tmp_path / "n.safetensors", arch="vit-d32x2/4", technique="mae",
                          img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    src = tmp_path / "w.pth"
    torch.save(model.state_dict(), src)
    conv = convert_checkpoint(src, tmp_path / "c.safetensors", num_heads=2)
    a, b = load_encoder(native).state_dict(), load_encoder(conv).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_metadata(conv)["arch"] == read_metadata(native)["arch"]


def to_mmpretrain(sd):
    """timm ViT keys -> mmpretrain VisionTransformer keys (names as in mmpretrain's backbone and mmcv's FFN)."""
    out = {}
    for k, v in sd.items():
        name = (k.replace("patch_embed.proj.", "patch_embed.projection.").replace("blocks.", "layers.")
                .replace(".norm1.", ".ln1.").replace(".norm2.", ".ln2.")
                .replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1."))
        if name.startswith("norm."):
            name = "ln1." + name[len("norm."):]
        out["backbone." + name] = v
    return out


def test_mmpretrain_mae_checkpoint(tmp_path):
    model = tiny_vit()
    sd = to_mmpretrain(model.state_dict())
    assert "backbone.layers.1.ffn.layers.0.0.weight" in sd and "backbone.ln1.bias" in sd
    sd.update({"neck.mask_token": torch.zeros(1, 1, 16), "neck.decoder_pos_embed": torch.zeros(1, 65, 16),
               "neck.decoder_blocks.0.ln1.weight": torch.ones(16), "neck.ln1.weight": torch.ones(16),
               "neck.decoder_pred.weight": torch.zeros(48, 16)})
    src = tmp_path / "mae_vit-base-p16_8xb512-amp-coslr-300e_in1k.pth"
    torch.save({"meta": {"epoch": 300, "mmengine_version": "0.10.7"}, "state_dict": sd}, src)
    dst = convert_checkpoint(src, tmp_path / "e.safetensors", num_heads=2, technique="mae")
    meta = read_metadata(dst)
    assert meta["source_layout"] == "mmpretrain" and meta["source_dropped"] == "neck(5)"
    assert same_outputs(model, dst)
