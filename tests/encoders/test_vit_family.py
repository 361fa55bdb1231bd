"""The ViT family's DINOv2 and I-JEPA variants: register tokens, no class token, layer scale, no_embed_class and
DINOv2's position resampling, read from timm, official and Hugging Face state dicts with the writer's features
(fp32, CPU, within 1e-5)."""
from __future__ import annotations

import json
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mimbench.encoders import convert_checkpoint, detect_layouts, load_encoder, read_metadata, save_encoder
from mimbench.encoders.dinov2 import hf_dinov2_registers_state, hf_dinov2_state
from mimbench.encoders.ijepa import hf_ijepa_state
from mimbench.encoders.resample import resample_pos_embed
from mimbench.errors import MimbenchError
from mimbench.evals.features import pool_tokens, resolve_pool

TINY = dict(img_size=28, embed_dim=32, depth=2, num_heads=2, num_classes=0)
TOL = 1e-5
_STANDARD = ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "technique", "config_sha256",
             "epochs", "data", "source", "mlp_ratio", "format", "code_version", "family")


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (zero-initialised tokens and unit gammas would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    return model.eval()


def _timm(name: str, **kwargs) -> torch.nn.Module:
    return _perturb(timm.create_model(name, pretrained=False, **(TINY | kwargs)))


def _images(size: int = 28, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _save(tensors, meta, dst):
    """An encoder file from ``(tensors, metadata)`` as the HF readers return them."""
    extra = {k: v for k, v in meta.items() if k not in _STANDARD}
    return save_encoder(tensors, dst, arch=meta["arch"], img_size=int(meta["img_size"]),
                        patch_size=int(meta["patch_size"]), embed_dim=int(meta["embed_dim"]), depth=int(meta["depth"]),
                        num_heads=int(meta["num_heads"]), technique=meta["technique"], source=meta["source"],
                        mlp_ratio=float(meta["mlp_ratio"]), extra=extra)


def _features(model, x, pool="auto"):
    """Pooled features of a loaded encoder as the evaluations compute them."""
    with torch.no_grad():
        return pool_tokens(model, model.forward_features(x), resolve_pool(pool, model.mimbench_metadata))


def _official_dinov2(sd: dict, slot: torch.Tensor | None = None) -> dict:
    """timm DINOv2 keys -> the official hub names (reverse of timm's ``_convert_dinov2``): ``mask_token`` (1, D), and
    for register models ``register_tokens`` and a ``pos_embed`` with a class slot the class token is stored
    without."""
    out = dict(sd, mask_token=torch.randn(1, sd["cls_token"].shape[-1]))
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")
        out["pos_embed"] = torch.cat([slot, out["pos_embed"]], dim=1)
        out["cls_token"] = out["cls_token"] - slot
    return out


# ------------------------------------------------------------------ timm and official DINOv2
@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_timm_and_official_dinov2_give_timms_class_token(tmp_path, name):
    model = _timm(name)
    x = _images()
    with torch.no_grad():
        want = model.forward_features(x)[:, 0]
    reg = "reg4" in name
    sources = {"timm": model.state_dict(),
               "official": _official_dinov2(model.state_dict(), torch.randn(1, 1, 32) if reg else None)}
    for kind, sd in sources.items():
        src = tmp_path / f"{kind}.pth"
        torch.save(sd, src)
        assert detect_layouts(torch.load(src, weights_only=True)) == ["dinov2"]
        dst = convert_checkpoint(src, tmp_path / f"{kind}.safetensors", num_heads=2)
        meta = read_metadata(dst)
        assert (meta["source_layout"], meta["technique"], meta["global_pool"]) == ("dinov2", "dinov2", "token")
        assert meta["pos_resample"] == ("dinov2-reg" if reg else "dinov2") and "init_values" in meta
        assert meta.get("reg_tokens", "0") == ("4" if reg else "0")
        assert ("mask_token(1)" in meta["source_dropped"]) == (kind == "official")
        enc = load_encoder(dst)
        got = _features(enc, x)
        assert torch.allclose(got, want, atol=TOL, rtol=0), (kind, (got - want).abs().max())
        assert torch.allclose(enc(x), want, atol=TOL, rtol=0)  # timm's own head pooling agrees
    with torch.no_grad():  # registers are never pooled: the patch mean starts after the class token and registers
        tokens = model.forward_features(x)
    assert torch.allclose(_features(enc, x, "avg"), tokens[:, 5 if reg else 1:].mean(dim=1), atol=TOL, rtol=0)
    both = _features(enc, x, "cls+avg")
    assert both.shape == (3, 64) and torch.allclose(both[:, :32], want, atol=TOL, rtol=0)


def test_dinov2_chunked_blocks_and_giant_swiglu(tmp_path):
    model = _timm("vit_small_patch14_dinov2")
    sd = _official_dinov2(model.state_dict())
    # block_chunks=2: chunk c holds Identity placeholders, then its blocks under their global index
    chunked = {re.sub(r"^blocks\.(\d+)\.", r"blocks.\1.\1.", k): v for k, v in sd.items()}
    assert "blocks.1.1.attn.qkv.weight" in chunked
    src = tmp_path / "chunked.pth"
    torch.save(chunked, src)
    enc = load_encoder(convert_checkpoint(src, tmp_path / "c.safetensors", num_heads=2))
    x = _images()
    with torch.no_grad():
        assert torch.allclose(enc(x), model.forward_features(x)[:, 0], atol=TOL, rtol=0)
    giant = dict(sd)
    giant["blocks.0.mlp.w12.weight"] = giant.pop("blocks.0.mlp.fc1.weight")
    torch.save(giant, src)
    with pytest.raises(MimbenchError, match="SwiGLU"):
        convert_checkpoint(src, tmp_path / "g.safetensors", num_heads=2, layout="dinov2")


# ------------------------------------------------------------------ position resampling
def _official_interpolate(pos: torch.Tensor, grid: int, offset: float, antialias: bool, prefix: int) -> torch.Tensor:
    """facebookresearch/dinov2 ``interpolate_pos_encoding`` on a stored ``pos_embed`` for a square ``grid``."""
    cls, patch = pos[:, :prefix], pos[:, prefix:]
    m, dim = int(patch.shape[1] ** 0.5), patch.shape[-1]
    patch = patch.reshape(1, m, m, dim).permute(0, 3, 1, 2).float()
    kwargs = {"scale_factor": ((grid + offset) / m, (grid + offset) / m)} if offset else {"size": (grid, grid)}
    patch = F.interpolate(patch, mode="bicubic", antialias=antialias, **kwargs)
    return torch.cat([cls, patch.permute(0, 2, 3, 1).view(1, -1, dim)], dim=1)


def test_dinov2_resampling_is_the_official_formula_at_another_size(tmp_path):
    model = _timm("vit_small_patch14_dinov2")
    src = tmp_path / "d.pth"
    torch.save(model.state_dict(), src)
    dst = convert_checkpoint(src, tmp_path / "d.safetensors", num_heads=2)
    big = load_encoder(dst, img_size=56)
    official = _official_interpolate(model.pos_embed.detach(), 4, 0.1, False, 1)
    assert torch.allclose(big.pos_embed, official, atol=1e-6, rtol=0)
    plain = resample_pos_embed(model.pos_embed.detach(), 4)  # the MAE rule: output size, no offset
    assert (plain - official).abs().max() > 1e-3  # the offset matters, so the test can tell the variants apart
    # registers: size, antialias, the position grid without prefix
    reg = _timm("vit_small_patch14_reg4_dinov2")
    torch.save(reg.state_dict(), src)
    big = load_encoder(convert_checkpoint(src, tmp_path / "r.safetensors", num_heads=2), img_size=70)
    assert torch.allclose(big.pos_embed, _official_interpolate(reg.pos_embed.detach(), 5, 0.0, True, 0),
                          atol=1e-6, rtol=0)


# ------------------------------------------------------------------ Hugging Face
def _hf(kind: str, **extra):
    from transformers import (  # optional dependency, only for these references
        Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel, IJepaConfig, IJepaModel,
    )

    config_cls, model_cls = {"dinov2": (Dinov2Config, Dinov2Model),
                             "dinov2-registers": (Dinov2WithRegistersConfig, Dinov2WithRegistersModel),
                             "ijepa": (IJepaConfig, IJepaModel)}[kind]
    config = config_cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        image_size=28, patch_size=14, **extra)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    _perturb(model, seed=3)
    return model


READERS = {"dinov2": (hf_dinov2_state, {}), "dinov2-registers": (hf_dinov2_registers_state, {"num_register_tokens": 4}),
           "ijepa": (hf_ijepa_state, {})}


@pytest.mark.parametrize("kind", sorted(READERS))
def test_hf_models_give_their_pooled_features(tmp_path, kind):
    reader, extra = READERS[kind]
    model = _hf(kind, **extra)
    x = _images()
    with torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state
    want = tokens.mean(dim=1) if kind == "ijepa" else tokens[:, 0]  # I-JEPA: no class token, no registers
    model.save_pretrained(tmp_path / "hf")
    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))  # the names save_pretrained writes
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for i, state in enumerate((saved, model.state_dict())):  # ... and transformers 5's in-memory names
        tensors, meta = reader(state, config)
        enc = load_encoder(_save(tensors, meta, tmp_path / f"{kind}{i}.safetensors"))
        got = _features(enc, x)
        assert got.shape == want.shape and torch.allclose(got, want, atol=TOL, rtol=0), (got - want).abs().max()
    assert meta["source_layout"] == f"hf-{kind}"
    assert meta["source_dropped"] == ("" if kind == "ijepa" else "embeddings.mask_token(1)")
    if kind == "ijepa":
        assert (meta["class_token"], meta["global_pool"], meta["norm_eps"]) == ("false", "avg", "1e-12")
    if kind == "dinov2-registers":
        assert (meta["reg_tokens"], meta["no_embed_class"], meta["pos_resample"]) == ("4", "true", "dinov2-reg")
        # HF's register model resamples as the official one does (size, antialias): equal at another size too
        big = load_encoder(tmp_path / f"{kind}0.safetensors", img_size=56)
        x56 = _images(56)
        with torch.no_grad():
            ref = model(pixel_values=x56).last_hidden_state[:, 0]
        assert torch.allclose(_features(big, x56), ref, atol=TOL, rtol=0)


def test_hf_config_that_disagrees_with_the_weights_is_refused():
    model = _hf("dinov2")
    config = model.config.to_dict() | {"image_size": 42}
    with pytest.raises(MimbenchError, match="config.json"):
        hf_dinov2_state(model.state_dict(), config)
    with pytest.raises(MimbenchError, match="register tokens"):
        hf_dinov2_registers_state(model.state_dict(), model.config.to_dict() | {"num_register_tokens": 4})


# ------------------------------------------------------------------ I-JEPA official
def _ijepa_vit(seed: int) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return _perturb(VisionTransformer(patch_size=14, class_token=False, global_pool="avg", fc_norm=False, **TINY),
                    seed)


def test_official_ijepa_reads_the_target_encoder_with_patch_mean(tmp_path):
    target, context = _ijepa_vit(1), _ijepa_vit(2)
    prefixed = lambda m: {f"module.{k}": v for k, v in m.state_dict().items()}  # noqa: E731
    src = tmp_path / "ijepa.pth.tar"
    torch.save({"encoder": prefixed(context), "target_encoder": prefixed(target),
                "predictor": {"module.predictor_embed.weight": torch.zeros(4, 32)}, "epoch": 300, "lr": 0.001}, src)
    assert detect_layouts(torch.load(src, weights_only=True)) == ["ijepa"]
    dst = convert_checkpoint(src, tmp_path / "ijepa.safetensors", num_heads=2)
    meta = read_metadata(dst)
    assert (meta["source_part"], meta["class_token"], meta["global_pool"], meta["technique"]) == \
        ("target_encoder", "false", "avg", "ijepa")
    assert "encoder(" in meta["source_dropped"] and "predictor(1)" in meta["source_dropped"]
    enc = load_encoder(dst)
    x = _images()
    with torch.no_grad():
        want = target.forward_features(x).mean(dim=1)
        assert torch.allclose(enc(x), want, atol=TOL, rtol=0)  # default head: mean of normed patch tokens
        assert not torch.allclose(context.forward_features(x).mean(dim=1), want, atol=1e-3)
    assert torch.allclose(_features(enc, x), want, atol=TOL, rtol=0)
    assert isinstance(enc.norm, torch.nn.LayerNorm)  # the per-token final norm is kept, not a fresh fc_norm
    with pytest.raises(MimbenchError, match="no class token"):
        resolve_pool("cls", meta)
    context_file = convert_checkpoint(src, tmp_path / "context.safetensors", "ijepa-context", num_heads=2)
    assert read_metadata(context_file)["source_part"] == "encoder"
    with torch.no_grad():
        assert torch.allclose(load_encoder(context_file)(x), context.forward_features(x).mean(dim=1), atol=TOL, rtol=0)
    big = load_encoder(dst, img_size=42)  # the N-token grid resampled directly
    assert big.pos_embed.shape == (1, 9, 32)


def test_files_without_the_new_fields_load_as_before(tiny_encoder):
    meta = read_metadata(tiny_encoder)
    assert not {"class_token", "reg_tokens", "no_embed_class", "init_values", "pos_resample", "global_pool"} & set(meta)
    model = load_encoder(tiny_encoder)
    assert (model.global_pool, model.num_prefix_tokens, model.reg_token, model.no_embed_class) == \
        ("token", 1, None, False)
    assert resolve_pool("auto", meta) == "cls"


@pytest.mark.parametrize("extra, message", [
    ({"reg_tokens": "-1"}, "reg_tokens"), ({"class_token": "maybe"}, "class_token"),
    ({"pos_resample": "nearest"}, "pos_resample"), ({"class_token": "false"}, "global_pool='avg'"),
])
def test_bad_vit_fields_are_refused_before_writing(tmp_path, extra, message):
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, **TINY)
    with pytest.raises(MimbenchError, match=message):
        save_encoder(model.state_dict(), tmp_path / "e.safetensors", arch="x", img_size=28, patch_size=14,
                     embed_dim=32, depth=2, num_heads=2, technique="t", extra={"init_values": "1e-05", **extra})
    assert not (tmp_path / "e.safetensors").exists()
