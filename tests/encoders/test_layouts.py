"""Every supported checkpoint layout: built from its source architecture with random weights, saved with
the published key names and wrapping, read by load_encoder (in memory) and by convert -- features equal.

timm builds the ViT / DeiT / BEiT / BEiT v2 source architectures; for the layouts without an
installable reference (DINO, iBOT, MoCo v3, VISSL, mmpretrain, data2vec) the checkpoint carries
the exact key names and nesting of the published files (docs/checkpoints.md) around a timm model
of the same architecture.
"""
from __future__ import annotations

import argparse
import os
from functools import partial

import pytest
import timm
import torch

from mimbench.testing import perturb
from timm.models.beit import gen_relative_position_index
from timm.models.vision_transformer import VisionTransformer

from mimbench.encoders import (
    convert_checkpoint, describe_encoder, detect_layouts, load_encoder, open_encoder, read_metadata,
)
from mimbench.errors import MimbenchError

D, HEADS, DEPTH, IMG, PATCH = 128, 2, 2, 32, 8  # 64-dim heads: the head count is implied by the width
GRID = IMG // PATCH



def vit(eps=1e-6, **kw):
    torch.manual_seed(0)
    args = dict(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=0,
                norm_layer=partial(torch.nn.LayerNorm, eps=eps))
    args.update(kw)
    return perturb(VisionTransformer(**args))


def beit(variant="beit_base_patch16_224", **kw):
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                num_classes=0, global_pool="token")
    args.update(kw)
    return perturb(timm.create_model(variant, **args))


def same_features(source, path, layout="auto", atol=1e-5):
    loaded = load_encoder(path, layout=layout)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = source.forward_features(x), loaded.forward_features(x)
    assert got.shape == want.shape
    return (got - want).abs().max().item() <= atol, loaded


def prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def noise(*shape):
    return torch.randn(*shape)


def with_index_buffers(sd, model):
    """unilm's BEiT code stores relative_position_index as persistent buffers."""
    out = dict(sd)
    index = gen_relative_position_index((GRID, GRID))
    if getattr(model, "rel_pos_bias", None) is not None:
        out["rel_pos_bias.relative_position_index"] = index
    for i, blk in enumerate(model.blocks):
        if blk.attn.relative_position_bias_table is not None:
            out[f"blocks.{i}.attn.relative_position_index"] = index
    return out


# ---------------------------------------------------------------- checkpoint builders, one per layout
def mae_ckpt(model):
    sd = dict(model.state_dict(), mask_token=noise(1, 1, D), decoder_pos_embed=noise(1, 17, 64))
    sd.update({"decoder_embed.weight": noise(64, D), "decoder_embed.bias": noise(64),
               "decoder_blocks.0.norm1.weight": noise(64), "decoder_norm.weight": noise(64),
               "decoder_pred.weight": noise(PATCH * PATCH * 3, 64)})
    return {"model": sd, "epoch": 799, "args": argparse.Namespace(model="mae_vit_base_patch16")}


def timm_ckpt(model):
    return model.state_dict()


def deit_ckpt(model):
    return {"model": model.state_dict(), "epoch": 299, "args": argparse.Namespace(model="deit_base_patch16_224")}


_TO_MMPRETRAIN = (("patch_embed.proj.", "patch_embed.projection."), (".norm1.", ".ln1."), (".norm2.", ".ln2."),
                  (".mlp.fc1.", ".ffn.layers.0.0."), (".mlp.fc2.", ".ffn.layers.1."), ("blocks.", "layers."))


def mmpretrain_ckpt(model):
    sd = {}
    for k, v in model.state_dict().items():
        name = "ln1." + k[5:] if k.startswith("norm.") else k
        for a, b in _TO_MMPRETRAIN:
            name = name.replace(a, b)
        sd["backbone." + name] = v
    sd["neck.decoder_embed.weight"] = noise(64, D)
    return {"meta": {"epoch": 400}, "state_dict": sd}


def dino_ckpt(model, ibot=False):
    student = vit()  # different weights: the teacher must be the one taken
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher = prefixed(model.state_dict(), "backbone.")
    student_sd = prefixed(student.state_dict(), "module.backbone.")
    head = {"head.mlp.0.weight": noise(256, D), "head.last_layer.weight_g": noise(1000, 1)}
    if ibot:
        teacher["backbone.masked_embed"] = noise(1, D)
        student_sd["module.backbone.masked_embed"] = noise(1, D)
    ckpt = {"student": student_sd | prefixed(head, "module."), "teacher": teacher | head, "epoch": 100,
            "args": argparse.Namespace(arch="vit_base"), "optimizer": {"state": {}, "param_groups": []}}
    ckpt["ibot_loss" if ibot else "dino_loss"] = {"center": noise(1, 1000)}
    return ckpt


def mocov3_ckpt(model):
    sd = prefixed(model.state_dict(), "module.base_encoder.")
    sd |= {"module.base_encoder.head.0.weight": noise(256, D), "module.predictor.0.weight": noise(256, 256)}
    sd |= prefixed(vit().state_dict(), "module.momentum_encoder.")
    return {"epoch": 300, "arch": "vit_base", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}


def vissl_ckpt(model):
    trunk = {{"cls_token": "class_token", "pos_embed": "pos_embedding"}.get(k, k): v
             for k, v in model.state_dict().items()}
    heads = {"0.clf.0.weight": noise(10, D), "0.clf.0.bias": noise(10)}
    return {"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}}}, "phase_idx": 4,
            "iteration": 1000, "type": "vissl"}


def beit_ckpt(model, extra=None):
    sd = with_index_buffers(model.state_dict(), model)
    sd |= {"mask_token": noise(1, 1, D), "lm_head.weight": noise(8192, D), "lm_head.bias": noise(8192)}
    sd |= extra or {}
    return {"model": sd, "epoch": 799, "args": argparse.Namespace(model="beit_base_patch16_224_8k_vocab")}


def beitv2_ckpt(model):
    pt = {"cls_pt_layers.0.norm1.weight": noise(D), "cls_pt_layers.0.attn.qkv.weight": noise(3 * D, D),
          "cls_pt_norm.weight": noise(D), "cls_pt_lm_head.weight": noise(8192, D)}
    return beit_ckpt(model, pt)


def data2vec_ckpt(model):
    sd = with_index_buffers(model.state_dict(), model)
    return {"model": sd | {"mask_token": noise(1, 1, D)}, "epoch": 799}


SHARED_BEIT = dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False, init_values=0.1)
CASES = {
    # layout: (source model, checkpoint builder, file suffix, auto-detected?, expected dropped, expected epochs)
    "mae": (vit, mae_ckpt, ".pth", True, "decoder_blocks(1),decoder_embed(2),decoder_norm(1),decoder_pos_embed(1),"
            "decoder_pred(1),mask_token(1)", 800.0),
    "timm": (partial(vit, num_classes=10), timm_ckpt, ".pth", True, "head(2)", 0.0),
    "deit": (partial(vit, num_classes=10), deit_ckpt, ".pth", False, "head(2)", 300.0),
    "mmpretrain": (vit, mmpretrain_ckpt, ".pth", True, "neck(1)", 0.0),
    "dino": (vit, dino_ckpt, ".pth", True, "head(2)", 100.0),
    "ibot": (vit, partial(dino_ckpt, ibot=True), ".pth", True, "head(2),masked_embed(1)", 100.0),
    "mocov3": (vit, mocov3_ckpt, ".pth.tar", True, "base_encoder(1),momentum_encoder(30),predictor(1)", 300.0),
    "vissl": (partial(vit, eps=1e-5, qkv_bias=False), vissl_ckpt, ".torch", True, "heads(2)", 0.0),
    "beit": (partial(beit, **SHARED_BEIT), beit_ckpt, ".pth", True,
             "lm_head(2),mask_token(1),rel_pos_bias(1)", 800.0),
    "beitv2": (partial(beit, "beitv2_base_patch16_224"), beitv2_ckpt, ".pth", True,
               "blocks(2),cls_pt_layers(2),cls_pt_lm_head(1),cls_pt_norm(1),lm_head(2),mask_token(1)", 800.0),
    "data2vec-vision": (partial(beit, **SHARED_BEIT), data2vec_ckpt, ".pt", False,
                        "mask_token(1),rel_pos_bias(1)", 800.0),
}


@pytest.mark.parametrize("layout", list(CASES))
def test_layout_features_equal_the_source_model(layout, tmp_path):
    build, make_ckpt, suffix, auto, dropped, epochs = CASES[layout]
    source = build()
    src = tmp_path / f"ckpt{suffix}"
    torch.save(make_ckpt(source), src)

    ok, loaded = same_features(source, src, layout="auto" if auto else layout)
    assert ok, f"{layout}: features differ from the source model's"
    meta = loaded.mimbench_metadata
    assert meta["source_layout"] == layout and meta["source_dropped"] == dropped
    assert float(meta["epochs"]) == epochs
    assert (meta["embed_dim"], meta["depth"], meta["num_heads"], meta["img_size"]) == (str(D), "2", "2", str(IMG))
    family = "beit" if layout.startswith(("beit", "data2vec")) else "vit"
    assert meta.get("family", "vit") == family
    assert type(loaded).__name__ == ("Beit" if family == "beit" else "VisionTransformer")
    assert sorted(os.listdir(tmp_path)) == [src.name]  # read in memory: nothing written

    # `mimbench convert` runs the same code: the file it writes gives the same features
    dst = convert_checkpoint(src, tmp_path / "enc.safetensors", layout="auto" if auto else layout)
    ok, from_file = same_features(source, dst)
    assert ok and from_file.mimbench_metadata["source_dropped"] == dropped
    assert read_metadata(dst)["source_sha256"] == meta["source_sha256"]


def test_beit_flags_follow_the_checkpoint(tmp_path):
    shared = beit(**SHARED_BEIT)
    torch.save(beit_ckpt(shared), tmp_path / "s.pth")
    meta = read_metadata(tmp_path / "s.pth")
    assert (meta["use_abs_pos_emb"], meta["use_rel_pos_bias"], meta["use_shared_rel_pos_bias"]) == (
        "false", "false", "true")
    assert meta["layer_scale_init_value"] == "0.1"
    both = beit(use_abs_pos_emb=True, init_values=0.0)  # absolute embeddings, per-block tables, no layer scale
    torch.save(data2vec_ckpt(both), tmp_path / "a.pth")
    ok, loaded = same_features(both, tmp_path / "a.pth", layout="beit")
    assert ok
    meta = loaded.mimbench_metadata
    assert (meta["use_abs_pos_emb"], meta["use_rel_pos_bias"], meta["layer_scale_init_value"]) == ("true", "true", "0.0")


def test_vissl_keeps_its_layernorm_eps(tmp_path):
    source = vit(eps=1e-5, qkv_bias=False)
    torch.save(vissl_ckpt(source), tmp_path / "v.torch")
    meta = read_metadata(tmp_path / "v.torch")
    assert meta["norm_eps"] == "1e-05" and "qkv.bias(2" in meta["source_filled"]
    # read with the ViT default eps 1e-6 the features would differ: the field is what keeps them exact
    assert any(m.eps == 1e-5 for m in load_encoder(tmp_path / "v.torch").modules()
               if isinstance(m, torch.nn.LayerNorm))


def test_pos_embed_and_relative_tables_resampled_on_load(tmp_path):
    from mimbench.encoders import resample_pos_embed, resize_rel_pos_table

    source = beit("beitv2_base_patch16_224", use_abs_pos_emb=True)
    torch.save(beitv2_ckpt(source), tmp_path / "b.pth")
    big = load_encoder(tmp_path / "b.pth", img_size=48)
    table = source.blocks[1].attn.relative_position_bias_table.detach()
    assert torch.equal(big.blocks[1].attn.relative_position_bias_table.detach(), resize_rel_pos_table(table, 6))
    assert torch.equal(big.pos_embed.detach(), resample_pos_embed(source.pos_embed.detach(), 6))
    with torch.no_grad():
        assert big(torch.randn(1, 3, 48, 48)).shape == (1, D)


def test_beit_encoder_fine_tunes_with_layer_decay(tmp_path):
    from mimbench.evals.finetune import build_model, build_optimizer

    torch.save(beitv2_ckpt(beit("beitv2_base_patch16_224")), tmp_path / "b.pth")
    model = build_model(tmp_path / "b.pth", 5, img_size=None, drop_path=0.1)
    assert type(model).__name__ == "Beit" and model.head.out_features == 5
    assert isinstance(model.norm, torch.nn.Identity) and model.fc_norm.weight.shape == (D,)  # mean pooling
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    scales = {}
    for group in opt.param_groups:
        for p in group["params"]:
            scales[id(p)] = group["lr_scale"]
    assert scales[id(model.cls_token)] == pytest.approx(0.65 ** 3)  # stem: layer 0 of depth + 1
    assert scales[id(model.blocks[0].attn.qkv.weight)] == pytest.approx(0.65 ** 2)
    assert scales[id(model.blocks[1].gamma_1)] == pytest.approx(0.65)
    assert scales[id(model.head.weight)] == pytest.approx(1.0)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.blocks[0].attn.relative_position_bias_table) in no_decay


def test_export_of_both_families_loads_in_timm(tmp_path):
    source = beit(**SHARED_BEIT)
    torch.save(beit_ckpt(source), tmp_path / "b.pth")
    enc = convert_checkpoint(tmp_path / "b.pth", tmp_path / "b.safetensors")
    model = timm.create_model("beit_base_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(enc)),
                              img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                              num_classes=0, global_pool="token", **SHARED_BEIT).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), source.forward_features(x), atol=1e-5)
    plain = vit()
    torch.save(mae_ckpt(plain), tmp_path / "m.pth")
    enc = convert_checkpoint(tmp_path / "m.pth", tmp_path / "m.safetensors")
    model = timm.create_model("vit_base_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(enc)),
                              img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                              num_classes=0).eval()
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), plain.forward_features(x), atol=1e-5)


# ---------------------------------------------------------------- detection and bad input
def test_detection_and_ambiguity(tmp_path):
    shared = beit(**SHARED_BEIT)
    assert detect_layouts(data2vec_ckpt(shared)) == ["beit", "beitv2", "data2vec-vision"]
    torch.save(data2vec_ckpt(shared), tmp_path / "d.pt")
    with pytest.raises(MimbenchError, match="beit, beitv2, data2vec-vision") as e:
        load_encoder(tmp_path / "d.pt")
    assert "--from" in str(e.value) and "d.pt" in str(e.value)
    assert read_metadata(tmp_path / "d.pt", layout="data2vec-vision")["technique"] == "data2vec"  # what --from does
    assert "data2vec" in describe_encoder(tmp_path / "d.pt", layout="data2vec-vision")
    with pytest.raises(MimbenchError, match="beit, beitv2, data2vec-vision"):  # the choice does not stick to the path
        read_metadata(tmp_path / "d.pt")
    with pytest.raises(MimbenchError, match="Unknown checkpoint layout"):
        load_encoder(tmp_path / "d.pt", layout="beit3")
    enc = convert_checkpoint(tmp_path / "d.pt", tmp_path / "d.safetensors", layout="beitv2")
    with pytest.raises(MimbenchError, match="Unknown checkpoint layout"):
        read_metadata(enc, layout="beit3")


def test_single_network_with_backbone_prefix(tmp_path):
    source = vit()
    torch.save({"state_dict": prefixed(source.state_dict(), "backbone.") | {"head.mlp.0.weight": noise(8, D)}},
               tmp_path / "teacher.pth")
    with pytest.raises(MimbenchError, match="dino, ibot"):
        load_encoder(tmp_path / "teacher.pth")
    ok, loaded = same_features(source, tmp_path / "teacher.pth", layout="ibot")
    assert ok and loaded.mimbench_metadata["source_dropped"] == "head(1)"


def test_layout_that_does_not_fit_the_checkpoint_is_refused(tmp_path):
    torch.save(mae_ckpt(vit()), tmp_path / "m.pth")
    with pytest.raises(MimbenchError, match="no base_encoder"):
        load_encoder(tmp_path / "m.pth", layout="mocov3")
    with pytest.raises(MimbenchError, match="no classy_state_dict"):
        load_encoder(tmp_path / "m.pth", layout="vissl")
    torch.save(beit_ckpt(beit(**SHARED_BEIT)), tmp_path / "b.pth")
    with pytest.raises(MimbenchError, match="BEiT-style tensors"):
        load_encoder(tmp_path / "b.pth", layout="mae")
    enc = convert_checkpoint(tmp_path / "m.pth", tmp_path / "m.safetensors")
    with pytest.raises(MimbenchError, match="already a mimbench encoder"):
        open_encoder(enc, layout="mae")


def test_left_over_or_missing_tensors_are_errors_not_partial_loads(tmp_path):
    sd = vit().state_dict()
    sd["blocks.1.attn.extra_scale"] = noise(D)
    torch.save({"model": sd}, tmp_path / "x.pth")
    with pytest.raises(MimbenchError, match="blocks.1.attn.extra_scale"):
        load_encoder(tmp_path / "x.pth")
    sd = vit().state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    torch.save(sd, tmp_path / "y.pth")
    with pytest.raises(MimbenchError, match="blocks.1.mlp.fc2.bias"):
        load_encoder(tmp_path / "y.pth")
    sd = beit(**SHARED_BEIT).state_dict()
    del sd["blocks.0.gamma_2"]
    torch.save({"model": sd | {"lm_head.weight": noise(8, D)}}, tmp_path / "z.pth")
    with pytest.raises(MimbenchError, match="gamma_2"):
        load_encoder(tmp_path / "z.pth")


class _RunsCode:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


def test_truncated_non_checkpoint_and_malicious_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(mae_ckpt(vit()), good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MimbenchError, match="cut.pth cannot be read as a PyTorch checkpoint"):
        load_encoder(cut)
    text = tmp_path / "notes.bin"
    text.write_text("not a checkpoint\n")
    with pytest.raises(MimbenchError, match="notes.bin cannot be read as a PyTorch checkpoint"):
        read_metadata(text)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": vit().state_dict(), "hook": _RunsCode(str(marker))}, evil)
    with pytest.raises(MimbenchError, match="refused for safety.*mkdir"):
        load_encoder(evil)
    assert not marker.exists()
    with pytest.raises(MimbenchError, match="not a checkpoint dict|not a state dict"):
        torch.save([torch.zeros(2)], tmp_path / "list.pth")
        load_encoder(tmp_path / "list.pth")


def test_checkpoint_whose_tensors_disagree_with_its_architecture_is_refused(tmp_path):
    sd = vit().state_dict()
    sd["blocks.1.mlp.fc1.weight"] = noise(2 * D, D)  # block 1 narrower than block 0
    sd["blocks.1.mlp.fc1.bias"] = noise(2 * D)
    sd["blocks.1.mlp.fc2.weight"] = noise(D, 2 * D)
    torch.save({"model": sd}, tmp_path / "w.pth")
    with pytest.raises(MimbenchError, match=r"blocks.1.mlp.fc1.weight: \(256, 128\) \(expected \(512, 128\)\)"):
        load_encoder(tmp_path / "w.pth")
    model = beit(use_abs_pos_emb=True)
    sd = dict(model.state_dict(), pos_embed=noise(1, 1 + 8 * 8, D))  # a 8x8 grid, tables for 4x4
    torch.save({"model": sd | {"lm_head.weight": noise(8, D)}}, tmp_path / "b.pth")
    with pytest.raises(MimbenchError, match="relative_position_bias_table"):
        load_encoder(tmp_path / "b.pth")
    torch.save(mae_ckpt(vit()), tmp_path / "m.pth")
    with pytest.raises(MimbenchError, match="given 3 does not divide"):
        convert_checkpoint(tmp_path / "m.pth", tmp_path / "m.safetensors", num_heads=3)
