"""The Eva family (timm ``Eva``): DINOv3 and EVA-02 checkpoints in timm, official and transformers names give the
features their own code computes (fp32, CPU, within 1e-5), and the evaluations read them as their authors do."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from mimbench.encoders import FAMILY_TABLE, convert_checkpoint, convert_state, load_encoder, read_metadata
from mimbench.encoders.convert import detect_layouts
from mimbench.encoders.eva_layouts import eva_layout_of, hf_dinov3_state
from mimbench.evals.features import pool_tokens, resolve_pool
from mimbench.errors import MimbenchError

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=0)
TOL = dict(rtol=1e-5, atol=1e-5)


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The model with every parameter moved off its initial value (layer scale 1e-5 and zero biases would
    hide a wrong mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _timm(name: str, size: int = 32, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return _perturbed(timm.create_model(name, **(TINY | dict(img_size=size) | kw)))


def _images(size: int = 32, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _same_features(reference: torch.nn.Module, path: Path, size: int = 32, **kw) -> torch.nn.Module:
    """load_encoder(path) at ``size`` computes ``reference``'s tokens and pooled features."""
    model = load_encoder(path, img_size=size, **kw)
    x = _images(size)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), reference.forward_features(x), **TOL)
        torch.testing.assert_close(model(x), reference(x), **TOL)
    return model


# ---------------------------------------------------------------- timm names
@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb",
                                  "vit_small_plus_patch16_dinov3"])
def test_timm_dinov3_state_dict_loads_with_the_same_features(name, tmp_path):
    ref = _timm(name, global_pool="token")
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    enc = convert_checkpoint(tmp_path / "w.pth", tmp_path / "e.safetensors")
    meta = read_metadata(enc)
    assert (meta["family"], meta["source_layout"], meta["technique"]) == ("eva", "dinov3", "dinov3")
    assert (meta["num_reg_tokens"], meta["norm_eps"], meta["rope_type"]) == ("4", "1e-05", "dinov3")
    model = _same_features(ref, enc)
    assert model.global_pool == "token"  # DINOv3's normed class token
    # rotary positions are recomputed at another size: nothing to resample, still the same model as timm's
    other = _perturbed(timm.create_model(name, **(TINY | dict(img_size=48, global_pool="token"))))
    other.load_state_dict(ref.state_dict())
    _same_features(other, enc, size=48)


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "eva02_base_patch14_224"])
def test_timm_eva02_state_dict_loads_with_the_same_features(name, tmp_path):
    ref = _timm(name, patch_size=14, size=28)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    enc = convert_checkpoint(tmp_path / "w.pth", tmp_path / "e.safetensors")
    meta = read_metadata(enc)
    assert (meta["source_layout"], meta["final_norm"], meta["linear_pool"], meta["rope_ref_grid"]) == \
        ("eva02", "pooled", "avg", "16")
    assert meta["img_size"] == "28" and meta["norm_eps"] == "1e-06"
    model = _same_features(ref, enc, size=28)
    assert model.global_pool == "avg"  # EVA-02: mean of the patch tokens, then fc_norm


# ---------------------------------------------------------------- official names
def _official_dinov3(sd: dict) -> dict:
    """timm vit_*_dinov3 keys -> the facebookresearch/dinov3 names (shared/PROTOCOLS.md), with the buffers and
    the pre-training tensors the official file holds; the key third of qkv.bias is garbage the mask zeroes."""
    out = {"mask_token": torch.randn(1, sd["cls_token"].shape[-1]), "rope_embed.periods": torch.rand(16)}
    for k, v in sd.items():
        if k.endswith("attn.q_bias"):
            v_bias = sd[k.replace("q_bias", "v_bias")]
            out[k.replace("q_bias", "qkv.bias")] = torch.cat([v, torch.randn_like(v) * 3, v_bias])
            out[k.replace("q_bias", "qkv.bias_mask")] = torch.full((3 * v.numel(),), float("nan"))
            continue
        if k.endswith("attn.v_bias"):
            continue
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        k = k.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.")
        if "mlp.w1." in k or any(key.endswith("mlp.fc1_g.weight") for key in sd):
            k = k.replace("mlp.fc2.", "mlp.w3.")
        out[k] = v
    return out


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3_qkvb", "vit_small_plus_patch16_dinov3_qkvb"])
def test_official_dinov3_state_dict_with_nan_bias_mask(name, tmp_path):
    ref = _timm(name, global_pool="token")
    official = _official_dinov3(ref.state_dict())
    assert "blocks.0.attn.qkv.bias_mask" in official and "storage_tokens" in official
    torch.save(official, tmp_path / "dinov3.pth")
    assert detect_layouts(torch.load(tmp_path / "dinov3.pth", weights_only=True)) == ["dinov3"]
    tensors, meta = convert_state(tmp_path / "dinov3.pth")
    assert all(torch.isfinite(v).all() for v in tensors.values())  # the NaN mask is not carried over
    assert "blocks(2)" in meta["source_dropped"] and "mask_token(1)" in meta["source_dropped"]
    _same_features(ref, tmp_path / "dinov3.pth")


def _official_eva02(sd: dict) -> dict:
    """timm eva02_* keys -> the baaivision/EVA asuka names (shared/PROTOCOLS.md), with their rope buffers."""
    out = {"rope.freqs_cos": torch.rand(16, 64), "rope.freqs_sin": torch.rand(16, 64)}
    renames = (("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"), ("mlp.norm.", "mlp.ffn_ln."),
               ("attn.norm.", "attn.inner_attn_ln."), ("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."),
               ("mlp.fc1.", "mlp.w12."), ("mlp.fc2.", "mlp.w3."))
    for k, v in sd.items():
        for old, new in renames:
            k = k.replace(old, new)
        out[k] = v
    return out


@pytest.mark.parametrize("name,kw", [("eva02_tiny_patch14_224", {}),
                                     ("eva02_base_patch14_224", dict(scale_attn_inner=True))])
def test_official_eva02_state_dict(name, kw, tmp_path):
    ref = _timm(name, patch_size=14, size=28, **kw)
    torch.save({"module": _official_eva02(ref.state_dict())}, tmp_path / "eva02.pt")
    tensors, meta = convert_state(tmp_path / "eva02.pt")
    assert meta["source_layout"] == "eva02" and meta["source_dropped"] == "rope(2)"
    assert meta["scale_attn_inner"] == ("true" if kw else "false")
    _same_features(ref, tmp_path / "eva02.pt", size=28)


# ---------------------------------------------------------------- transformers
@pytest.mark.parametrize("gated", [False, True])
def test_hf_dinov3_state_gives_the_features_of_the_transformers_model(gated, tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel  # heavy, optional

    config = DINOv3ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=96,
                             patch_size=8, image_size=32, num_register_tokens=4, layerscale_value=1e-5,
                             use_gated_mlp=gated, hidden_act="silu" if gated else "gelu")
    torch.manual_seed(0)
    hf = _perturbed(DINOv3ViTModel(config))
    tensors, meta = hf_dinov3_state(hf.state_dict(), config.to_dict())
    assert (meta["family"], meta["source_layout"], meta["img_size"], meta["swiglu_mlp"]) == \
        ("eva", "hf-dinov3", "32", "true" if gated else "false")
    save_file(tensors, str(tmp_path / "hf.safetensors"), metadata=meta)
    model = load_encoder(tmp_path / "hf.safetensors")
    x = _images()
    with torch.no_grad():
        out = hf(pixel_values=x)
        torch.testing.assert_close(model.forward_features(x), out.last_hidden_state, **TOL)
        torch.testing.assert_close(model(x), out.pooler_output, **TOL)
    with pytest.raises(MimbenchError, match="key_bias"):
        hf_dinov3_state(hf.state_dict(), config.to_dict() | {"key_bias": True})


# ---------------------------------------------------------------- detection, metadata, pooling, layer decay
def test_dinov2_keys_are_not_taken_for_an_eva_layout():
    # DINOv2 giant (official names): SwiGLU w12/w3 and layer scale, like EVA-02 Ti and DINOv3; neither it is
    d = 8
    sd = {"cls_token": torch.zeros(1, 1, d), "pos_embed": torch.zeros(1, 5, d), "blocks.0.ls1.gamma": torch.ones(d),
          "blocks.0.mlp.w12.weight": torch.zeros(4 * d, d), "blocks.0.mlp.w3.weight": torch.zeros(d, 2 * d)}
    assert eva_layout_of(sd) is None
    assert eva_layout_of({k: v for k, v in sd.items() if "ls1" not in k}) == "eva02"


def test_bad_eva_metadata_is_refused(tmp_path):
    torch.save(_timm("vit_small_patch16_dinov3").state_dict(), tmp_path / "w.pth")
    tensors, meta = convert_state(tmp_path / "w.pth")
    for field, value, match in [("rope_type", "mixed", "not one of dinov3, cat"), ("qkv_fused", "maybe", "true/false"),
                                ("num_reg_tokens", "-1", "not a valid number")]:
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta | {field: value})
        with pytest.raises(MimbenchError, match=match):
            load_encoder(tmp_path / "bad.safetensors")


def test_pooling_follows_the_authors(tmp_path):
    torch.save(_timm("vit_small_patch16_dinov3").state_dict(), tmp_path / "d.pth")
    torch.save(_timm("eva02_tiny_patch14_224", patch_size=14, size=28).state_dict(), tmp_path / "e.pth")
    dino, eva = read_metadata(tmp_path / "d.pth"), read_metadata(tmp_path / "e.pth")
    assert (resolve_pool(None, dino, task="knn"), resolve_pool("auto", dino, task="linear")) == ("cls", "cls+avg")
    assert (resolve_pool(None, eva, task="knn"), resolve_pool(None, eva, task="linear")) == ("avg", "avg")
    assert resolve_pool("avg", dino, task="knn") == "avg"  # --pool wins over the family's default
    assert resolve_pool(None, {k: v for k, v in dino.items() if k != "family"} | {
        "family": "beit", "use_abs_pos_emb": "true", "use_rel_pos_bias": "false", "use_shared_rel_pos_bias": "false",
        "layer_scale_init_value": "0.0"}, task="linear") == "cls"
    model = load_encoder(tmp_path / "d.pth", img_size=32)
    x = _images()
    with torch.no_grad():
        tokens = model.forward_features(x)
        both = pool_tokens(model, tokens, "cls+avg")
    assert both.shape == (2, 128)
    torch.testing.assert_close(both[:, :64], tokens[:, 0])
    torch.testing.assert_close(both[:, 64:], tokens[:, 5:].mean(1))  # registers (tokens 1-4) left out
    model = load_encoder(tmp_path / "e.pth")
    with torch.no_grad():
        torch.testing.assert_close(pool_tokens(model, model.forward_features(x[:, :, :28, :28]), "avg"),
                                   model(x[:, :, :28, :28]), **TOL)  # timm: mean patch token, then fc_norm


def test_pool_override_reads_eva02_through_its_pooled_norm(tmp_path):
    from mimbench.evals.features import POOLED_NORM, feature_read, read_features, readout

    ref = _timm("eva02_tiny_patch14_224", patch_size=14, size=28)  # timm: mean patch token, then fc_norm
    torch.save(ref.state_dict(), tmp_path / "e.pth")
    path = convert_checkpoint(tmp_path / "e.pth", tmp_path / "e.safetensors")
    model = load_encoder(path)
    x = _images(28)
    default, override = readout(path, pool=None, task="linear"), readout(path, pool="cls+avg", task="linear")
    assert (default.pool, override.pool) == ("avg", "cls+avg") and default.describe()["norm"] == POOLED_NORM
    assert not override.is_default and "fc_norm" in feature_read(override)
    with torch.no_grad():
        torch.testing.assert_close(read_features(model, x, default), ref(x), **TOL)
        both = read_features(model, x, override)
        tokens = ref.forward_features(x)
        token_ref = ref.fc_norm(tokens[:, 0])  # timm's forward_head with global_pool="token"
    assert both.shape == (2, 2 * 64)
    torch.testing.assert_close(both[:, :64], token_ref, **TOL)
    torch.testing.assert_close(both[:, 64:], ref(x), **TOL)


def test_layer_decay_groups_cover_every_parameter_once(tmp_path):
    torch.save(_timm("vit_small_plus_patch16_dinov3_qkvb").state_dict(), tmp_path / "d.pth")
    model = load_encoder(tmp_path / "d.pth", img_size=32, global_pool="avg", fc_norm=True, num_classes=5)
    groups = FAMILY_TABLE["eva"].layer_decay_groups(model, weight_decay=0.05, layer_decay=0.5)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(seen) == len(set(seen))
    scale = {n: g["lr_scale"] for g in groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert scale["reg_token"] == scale["cls_token"] == scale["patch_embed.proj.weight"] == 0.5 ** 3
    assert scale["blocks.0.gamma_1"] == scale["blocks.0.attn.q_bias"] == 0.5 ** 2
    assert scale["blocks.1.mlp.fc1_g.weight"] == 0.5 and scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    decay = {n: g["weight_decay"] for g in groups for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert decay["reg_token"] == decay["blocks.0.gamma_1"] == 0.0 and decay["blocks.0.attn.qkv.weight"] == 0.05


# ---------------------------------------------------------------- evaluations end to end
@pytest.fixture(scope="module")
def dinov3_encoder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dinov3")
    torch.save(_timm("vit_small_patch16_dinov3").state_dict(), tmp / "w.pth")
    return convert_checkpoint(tmp / "w.pth", tmp / "dinov3.safetensors")


def test_eval_knn_reads_the_normed_class_token(dinov3_encoder, tmp_path):
    from mimbench.evals import run_eval

    record = run_eval("knn", encoder=dinov3_encoder, config="eval_configs/demo/knn_fmnist.py",
                      data="builtin:fashion-mnist", out=tmp_path,
                      overrides=["img_size=32", "data.limit_train=40", "data.limit_val=16"], resume=False)
    assert record["protocol"]["pool"] == "cls" and record["protocol"]["bank"]["dim"] == 64
    assert record["protocol"]["feature"].startswith("class token after final norm")
    assert record["encoder"]["family"] == "eva" and 0.0 <= record["metrics"]["top1"] <= 100.0
    record = run_eval("knn", encoder=dinov3_encoder, config="eval_configs/demo/knn_fmnist.py",
                      data="builtin:fashion-mnist", out=tmp_path / "avg", pool="avg",
                      overrides=["img_size=32", "data.limit_train=40", "data.limit_val=16"], resume=False)
    assert record["protocol"]["pool"] == "avg" and record["protocol"]["bank"]["dim"] == 64
    assert record["protocol"]["feature"].startswith("mean of the patch tokens")


def test_eval_linear_reads_class_token_and_mean_patch_token(dinov3_encoder, tmp_path):
    from mimbench.evals import run_eval
    from mimbench.evals.features import extract_features

    record = run_eval("linear", encoder=dinov3_encoder, config="eval_configs/demo/linear_fmnist.py",
                      data="builtin:fashion-mnist", out=tmp_path,
                      overrides=["img_size=32", "data.limit_train=32", "data.limit_val=16", "optim.batch_size=16",
                                 "schedule.epochs=1", "schedule.warmup_epochs=0"])
    assert record["protocol"]["pool"] == "cls+avg" and record["encoder"]["family"] == "eva"
    assert record["protocol"]["readout"]["pool"] == "cls+avg" and "⊕" in record["protocol"]["feature"]
    assert 0.0 <= record["metrics"]["top1"] <= 100.0
    feats, _, info = extract_features(dinov3_encoder, "builtin:fashion-mnist", "val", cache_dir=tmp_path / "c",
                                      img_size=32, limit=4, pool="cls+avg")
    assert feats.shape == (4, 128) and info["pool"] == "cls+avg"


def test_eval_finetune_runs_with_layer_decay_over_the_eva_blocks(dinov3_encoder, tmp_path):
    from mimbench.evals import run_eval

    record = run_eval("finetune", encoder=dinov3_encoder, config="eval_configs/demo/finetune_fmnist.py",
                      data="builtin:fashion-mnist", out=tmp_path,
                      overrides=["img_size=32", "data.limit_train=32", "data.limit_val=16", "optim.batch_size=16",
                                 "schedule.epochs=1", "schedule.warmup_epochs=0"])
    assert record["task"] == "finetune" and record["encoder"]["family"] == "eva"
    assert 0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 100
    ck = torch.load(tmp_path / "checkpoint-latest.pt", weights_only=True)
    assert "reg_token" in ck["model"] and "blocks.1.gamma_2" in ck["model"] and "head.weight" in ck["model"]


def test_info_lists_the_eva_fields(dinov3_encoder, tmp_path):
    from mimbench.encoders import describe_encoder

    text = describe_encoder(dinov3_encoder)
    assert "family" in text and "rope_type" in text and "linear_pool" in text and "cls+avg" in text
