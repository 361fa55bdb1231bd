"""Evaluations take official-layout checkpoints directly (no convert step), for both encoder families."""
from __future__ import annotations

import argparse
import hashlib
import json
import re
from functools import partial

import timm
import torch
from typer.testing import CliRunner

from mimbench.cli import app
from mimbench.encoders import convert_checkpoint
from mimbench.evals import run_eval

runner = CliRunner()
KNN_SET = ["--set", "data.limit_train=200", "--set", "data.limit_val=50"]


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m", "", text))


def _mae_pth(path):
    """An official-MAE pre-training checkpoint of a tiny ViT (64-dim heads, so the head count is implied)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=0,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    sd = dict(vit.state_dict(), mask_token=torch.zeros(1, 1, 64), decoder_pos_embed=torch.zeros(1, 17, 32))
    sd.update({"decoder_embed.weight": torch.zeros(32, 64), "decoder_pred.weight": torch.zeros(192, 32)})
    torch.save({"model": sd, "epoch": 1599, "args": argparse.Namespace(model="mae_vit_tiny")}, path)
    return path


def _data2vec_pt(path):
    """A BEiT-code checkpoint without lm_head: the key layout of BEiT, BEiT v2 and data2vec alike."""
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                              depth=2, num_heads=1, num_classes=0, global_pool="token",
                              use_shared_rel_pos_bias=True, use_rel_pos_bias=False)
    torch.save({"model": dict(model.state_dict(), mask_token=torch.zeros(1, 1, 64)), "epoch": 799}, path)
    return path


def test_eval_knn_on_an_official_mae_pth_without_convert(tmp_path):
    src = _mae_pth(tmp_path / "mae_pretrain_vit_tiny.pth")
    result = runner.invoke(app, ["eval", "knn", "--encoder", str(src), "--out", str(tmp_path / "run"), *KNN_SET])
    assert result.exit_code == 0, result.output
    (record_path,) = (tmp_path / "run").glob("*.json")
    record = json.loads(record_path.read_text())
    enc = record["encoder"]
    assert enc["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()  # the file given, not a converted copy
    assert (enc["layout"], enc["family"], enc["technique"], enc["epochs"]) == ("mae", "vit", "mae", 1600.0)
    assert "decoder_embed(1)" in enc["dropped"] and "mask_token(1)" in enc["dropped"]
    assert list(tmp_path.glob("*.safetensors")) == []

    # the same evaluation of the converted file gives the same numbers: one conversion code path
    enc_file = convert_checkpoint(src, tmp_path / "mae.safetensors")
    converted = run_eval("knn", encoder=enc_file, config="eval_configs/demo/knn_fmnist.py",
                         data="builtin:fashion-mnist", out=tmp_path / "run2",
                         overrides=["data.limit_train=200", "data.limit_val=50"], resume=False)
    assert converted["metrics"] == record["metrics"]


def test_eval_knn_on_a_beit_family_checkpoint_needs_from_when_ambiguous(tmp_path):
    src = _data2vec_pt(tmp_path / "data2vec_vision_base.pt")
    out = tmp_path / "run"
    ambiguous = runner.invoke(app, ["eval", "knn", "--encoder", str(src), "--out", str(out), *KNN_SET])
    assert ambiguous.exit_code == 2
    assert "beit, beitv2, data2vec-vision" in _plain(ambiguous.output) and "--from" in _plain(ambiguous.output)
    result = runner.invoke(app, ["eval", "knn", "--encoder", str(src), "--from", "data2vec-vision", "--out", str(out),
                                 *KNN_SET])
    assert result.exit_code == 0, result.output
    (record_path,) = out.glob("*.json")
    enc = json.loads(record_path.read_text())["encoder"]
    assert (enc["layout"], enc["family"], enc["technique"]) == ("data2vec-vision", "beit", "data2vec")


def test_linear_probe_of_a_beit_encoder(tmp_path):
    src = _data2vec_pt(tmp_path / "beit.pth")
    convert_checkpoint(src, tmp_path / "beit.safetensors", layout="beit")
    record = run_eval("linear", encoder=tmp_path / "beit.safetensors", config="eval_configs/demo/linear_fmnist.py",
                      data="builtin:fashion-mnist", out=tmp_path / "lin",
                      overrides=["data.limit_train=128", "data.limit_val=32", "optim.batch_size=64",
                                 "schedule.epochs=2", "schedule.warmup_epochs=1"])
    assert record["encoder"]["family"] == "beit" and record["encoder"]["layout"] == "beit"
    assert 0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 100
