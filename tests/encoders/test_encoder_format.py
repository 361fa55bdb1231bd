"""Encoder file format: round trip, metadata, position-embedding resampling, and every bad input."""
from __future__ import annotations

import hashlib
import os
from functools import partial

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

import mimbench
from mimbench.encoders import (FORMAT_TAG, describe_encoder, encoder_sha256, load_encoder, read_metadata,
                               save_encoder)
from mimbench.encoders.vit import expected_shapes
from mimbench.errors import MimbenchError

ARCH = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def tiny_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    args = dict(ARCH, num_classes=0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    args.update(kw)
    model = VisionTransformer(**args).eval()
    # non-trivial norms and biases, so that dropping or re-initialising any of them shows in the outputs
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture
def tiny(tmp_path):
    model = tiny_vit()
    path = save_encoder(model.state_dict(), tmp_path / "enc.safetensors", arch="vit-d32x2/4", technique="mae",
                        config_sha256="c0ffee", epochs=3, data="builtin:fashion-mnist", **ARCH)
    return model, path


def test_round_trip_gives_identical_outputs_and_tensors(tiny):
    model, path = tiny
    loaded = load_encoder(path)
    assert not loaded.training
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
        assert torch.equal(model.forward_features(x), loaded.forward_features(x))
    assert isinstance(loaded.head, torch.nn.Identity) and loaded.num_classes == 0
    ref = model.state_dict()
    got = loaded.state_dict()
    assert set(ref) == set(got)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert loaded.blocks[0].norm1.eps == 1e-6 and loaded.norm.eps == 1e-6


def test_metadata_preserved(tiny):
    _, path = tiny
    meta = read_metadata(path)
    assert meta["format"] == FORMAT_TAG
    assert (meta["img_size"], meta["patch_size"], meta["embed_dim"], meta["depth"], meta["num_heads"]) == (
        "32", "4", "32", "2", "2")
    assert float(meta["mlp_ratio"]) == 4.0 and float(meta["epochs"]) == 3.0
    assert (meta["technique"], meta["config_sha256"], meta["data"], meta["source"]) == (
        "mae", "c0ffee", "builtin:fashion-mnist", "mimbench")
    assert meta["code_version"].startswith(mimbench.__version__)
    assert load_encoder(path).mimbench_metadata == meta


def test_extra_metadata_kept_and_cannot_override(tmp_path):
    sd = tiny_vit().state_dict()
    p = save_encoder(sd, tmp_path / "e.safetensors", arch="a", technique="t", extra={"source_layout": "mae"}, **ARCH)
    assert read_metadata(p)["source_layout"] == "mae"
    with pytest.raises(MimbenchError, match="override"):
        save_encoder(sd, tmp_path / "f.safetensors", arch="a", technique="t", extra={"format": "x"}, **ARCH)


@pytest.mark.parametrize("mlp_ratio", [4.0, 2.0])
def test_expected_shapes_are_timm_vit_state_dict(mlp_ratio):
    model = VisionTransformer(**ARCH, mlp_ratio=mlp_ratio, num_classes=0)
    want = expected_shapes(img_size=32, patch_size=4, embed_dim=32, depth=2, mlp_ratio=mlp_ratio)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want


def test_pos_embed_interpolated_like_timm(tiny):
    model, path = tiny
    big = load_encoder(path, img_size=48)
    assert big.pos_embed.shape == (1, 1 + 12 * 12, 32)
    expected = resample_abs_pos_embed(model.pos_embed.detach(), new_size=[12, 12], num_prefix_tokens=1,
                                      antialias=False)
    assert torch.equal(big.pos_embed.detach(), expected)
    # the official MAE fine-tuning resamples with plain bicubic, align_corners=False, on the patch grid
    grid = model.pos_embed.detach()[:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    mae = torch.nn.functional.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False)
    assert torch.allclose(big.pos_embed[:, 1:].detach(), mae.permute(0, 2, 3, 1).flatten(1, 2), atol=1e-6)
    # timm's own default (anti-aliased bicubic) is a different kernel: it is never what load_encoder does
    timm_default = resample_abs_pos_embed(model.pos_embed.detach(), new_size=[12, 12], num_prefix_tokens=1)
    assert not torch.allclose(big.pos_embed.detach(), timm_default, atol=1e-4)
    assert torch.equal(big.pos_embed[:, 0], model.pos_embed[:, 0])  # class position kept
    with torch.no_grad():
        assert big(torch.randn(2, 3, 48, 48)).shape == (2, 32)
    small = load_encoder(path, img_size=16)
    assert small.pos_embed.shape == (1, 1 + 4 * 4, 32)


def test_avg_pool_with_fresh_fc_norm(tiny):
    model, path = tiny
    ft = load_encoder(path, global_pool="avg", drop_path_rate=0.1)
    assert isinstance(ft.norm, torch.nn.Identity)  # timm moves the final norm after pooling
    assert torch.equal(ft.fc_norm.weight, torch.ones(32)) and torch.equal(ft.fc_norm.bias, torch.zeros(32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.blocks(model._pos_embed(model.patch_embed(x)))
        want = torch.nn.functional.layer_norm(tokens[:, 1:].mean(1), (32,), eps=1e-6)
        assert torch.allclose(ft(x), want, atol=1e-6)
    head = load_encoder(path, num_classes=7)
    assert head(x).shape == (2, 7)


def test_lazy_package_attribute(tiny):
    _, path = tiny
    assert mimbench.load_encoder is load_encoder
    assert mimbench.read_metadata(path)["technique"] == "mae"


def test_sha256_and_describe(tiny):
    model, path = tiny
    sha = encoder_sha256(path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    text = describe_encoder(path)
    n = sum(p.numel() for p in model.parameters())
    assert f"{n:,}" in text and sha[:16] in text and "builtin:fashion-mnist" in text


# ---- bad inputs -------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(MimbenchError, match="does not exist"):
        load_encoder(tmp_path / "nope.safetensors")
    with pytest.raises(MimbenchError, match="not a file"):
        read_metadata(tmp_path)


def test_corrupt_bytes_and_truncation(tiny, tmp_path):
    _, path = tiny
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(MimbenchError, match="not a readable safetensors"):
        load_encoder(junk)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(MimbenchError, match="corrupt or truncated"):
        load_encoder(cut)


def test_pth_given_to_loader_is_read_in_memory(tmp_path):
    model = tiny_vit(embed_dim=64, num_heads=1)  # a head count that the width implies (64-dim heads)
    p = tmp_path / "w.pth"
    torch.save(model.state_dict(), p)
    loaded = load_encoder(p)  # a timm-layout checkpoint: converted in memory, nothing written
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.mimbench_metadata["source_layout"] == "timm" and loaded.mimbench_metadata["num_heads"] == "1"
    assert sorted(os.listdir(tmp_path)) == ["w.pth"]


def _raw(tmp_path, tensors, **meta_over):
    meta = {"format": FORMAT_TAG, "arch": "a", "img_size": "32", "patch_size": "4", "embed_dim": "32", "depth": "2",
            "num_heads": "2", "mlp_ratio": "4.0", "technique": "t", "config_sha256": "", "epochs": "0", "data": "",
            "code_version": "x", "source": "s"}
    meta.update(meta_over)
    meta = {k: v for k, v in meta.items() if v is not None}
    p = tmp_path / "raw.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, p, metadata=meta)
    return p


def test_wrong_or_absent_format_tag(tmp_path):
    sd = tiny_vit().state_dict()
    with pytest.raises(MimbenchError, match="format 'mimbench-encoder/9'"):
        load_encoder(_raw(tmp_path, sd, format="mimbench-encoder/9"))
    # without the mimbench tag a safetensors file is a foreign checkpoint: read as the timm layout
    foreign = load_encoder(_raw(tmp_path, tiny_vit(embed_dim=64, num_heads=1).state_dict(), format=None))
    assert foreign.mimbench_metadata["source_layout"] == "timm"
    with pytest.raises(MimbenchError, match="lacks technique"):
        read_metadata(_raw(tmp_path, sd, technique=None))
    with pytest.raises(MimbenchError, match="depth"):
        read_metadata(_raw(tmp_path, sd, depth="two"))


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = tiny_vit().state_dict()
    del sd["blocks.1.attn.qkv.bias"]
    sd["decoder_pred.weight"] = torch.zeros(2, 2)
    with pytest.raises(MimbenchError) as e:
        load_encoder(_raw(tmp_path, sd))
    assert "blocks.1.attn.qkv.bias" in str(e.value) and "decoder_pred.weight" in str(e.value)


def test_shape_mismatch_with_metadata(tmp_path):
    sd = tiny_vit().state_dict()
    with pytest.raises(MimbenchError, match=r"pos_embed: \(1, 65, 32\) \(expected \(1, 257, 32\)\)"):
        load_encoder(_raw(tmp_path, sd, img_size="64"))
    with pytest.raises(MimbenchError, match="not divisible by num_heads"):
        load_encoder(_raw(tmp_path, sd, num_heads="3"))


def test_architecture_kwargs_cannot_be_overridden(tiny):
    _, path = tiny
    with pytest.raises(MimbenchError, match="embed_dim"):
        load_encoder(path, embed_dim=64)
    with pytest.raises(MimbenchError, match="does not fit"):
        load_encoder(path, global_pool="map")  # attention pooling adds parameters absent from the file


def test_save_refuses_bad_state_dict_before_writing(tmp_path):
    sd = tiny_vit(num_classes=5).state_dict()  # has head.*
    target = tmp_path / "e.safetensors"
    with pytest.raises(MimbenchError, match="head.weight"):
        save_encoder(sd, target, arch="a", technique="t", **ARCH)
    assert not target.exists()
    with pytest.raises(MimbenchError, match="not a tensor"):
        save_encoder({"cls_token": [0.0]}, target, arch="a", technique="t", **ARCH)


def test_save_is_atomic(tiny, tmp_path, monkeypatch):
    _, path = tiny
    before = path.read_bytes()
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(MimbenchError, match="No space left"):
        save_encoder(tiny_vit().state_dict(), path, arch="a", technique="t", **ARCH)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_save_into_unwritable_location(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MimbenchError, match="Cannot write"):
        save_encoder(tiny_vit().state_dict(), blocker / "e.safetensors", arch="a", technique="t", **ARCH)


def test_img_size_must_be_whole_patches(tiny):
    _, path = tiny
    with pytest.raises(MimbenchError, match="not a multiple of the patch size"):
        load_encoder(path, img_size=30)
