"""k-NN, linear probe and fine-tuning on a DINOv2-with-registers and an I-JEPA-style encoder file (tiny, demo data):
each runs end to end, pools as the encoder's authors do and says in the record which tokens it read."""
from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import timm
import torch

from mimbench.testing import perturb
from typer.testing import CliRunner

from mimbench.cli import app
from mimbench.encoders import convert_checkpoint, load_encoder, read_metadata
from mimbench.evals import run_eval
from mimbench.evals.features import extract_features
from mimbench.errors import MimbenchError

runner = CliRunner()
SMALL = ["data.limit_train=64", "data.limit_val=32"]



@pytest.fixture(scope="module")
def reg_encoder(tmp_path_factory):
    """A tiny timm DINOv2-with-registers encoder file (patch 14, 28 px, 4 registers, layer scale)."""
    tmp = tmp_path_factory.mktemp("reg")
    model = perturb(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=28,
                                         embed_dim=32, depth=2, num_heads=2, num_classes=0))
    torch.save(model.state_dict(), tmp / "reg.pth")
    return convert_checkpoint(tmp / "reg.pth", tmp / "reg.safetensors", num_heads=2)


@pytest.fixture(scope="module")
def ijepa_encoder(tmp_path_factory):
    """A tiny official-layout I-JEPA checkpoint (no class token) converted to an encoder file."""
    from timm.models.vision_transformer import VisionTransformer

    tmp = tmp_path_factory.mktemp("ijepa")
    vit = perturb(VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                                       class_token=False, global_pool="avg", fc_norm=False,
                                       norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)))
    sd = {f"module.{k}": v for k, v in vit.state_dict().items()}
    torch.save({"encoder": sd, "target_encoder": sd, "predictor": {}, "epoch": 10}, tmp / "ijepa.pth.tar")
    return convert_checkpoint(tmp / "ijepa.pth.tar", tmp / "ijepa.safetensors", num_heads=2)


def _record(out):
    (path,) = out.glob("*.json")
    return json.loads(path.read_text())


def test_eval_knn_on_a_dinov2_registers_encoder(reg_encoder, tmp_path):
    out = tmp_path / "knn"
    result = runner.invoke(app, ["eval", "knn", "--encoder", str(reg_encoder), "--out", str(out),
                                 "--set", "data.limit_train=100", "--set", "data.limit_val=40"])
    assert result.exit_code == 0, result.output
    record = _record(out)
    assert record["protocol"]["pool"] == "cls" and record["protocol"]["feature"].startswith("class token")
    assert 0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 100
    # the features are the class tokens of the timm model (registers are not read) ...
    feats, _, info = extract_features(reg_encoder, "builtin:fashion-mnist", "val", cache_dir=out / "feature_cache",
                                      limit=40)
    assert info["cached"] and feats.shape == (40, 32)
    # ... and --pool avg reads the patch tokens only: another cache entry, another record line
    avg = runner.invoke(app, ["eval", "knn", "--encoder", str(reg_encoder), "--out", str(tmp_path / "avg"),
                              "--pool", "avg", "--set", "data.limit_train=100", "--set", "data.limit_val=40"])
    assert avg.exit_code == 0, avg.output
    protocol = _record(tmp_path / "avg")["protocol"]
    assert protocol["pool"] == "avg" and "register tokens excluded" in protocol["feature"]
    avg_feats, _, _ = extract_features(reg_encoder, "builtin:fashion-mnist", "val", limit=40, pool="avg",
                                       cache_dir=tmp_path / "avg" / "feature_cache")
    assert not np.allclose(np.asarray(avg_feats), np.asarray(feats), atol=1e-3)


def test_eval_linear_cached_on_an_ijepa_encoder(ijepa_encoder, tmp_path):
    meta = read_metadata(ijepa_encoder)
    assert (meta["class_token"], meta["global_pool"], meta["source_part"]) == ("false", "avg", "target_encoder")
    record = run_eval("linear", encoder=ijepa_encoder, config="eval_configs/demo/linear_fmnist.py",
                      data="builtin:fashion-mnist", out=tmp_path / "lin",
                      overrides=SMALL + ["schedule.epochs=2", "schedule.warmup_epochs=0", "optim.batch_size=16"])
    assert record["protocol"]["mode"] == "cached" and record["protocol"]["pool"] == "avg"
    assert record["protocol"]["feature"].startswith("mean of the patch tokens after final norm")
    assert 0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 100
    # the cached features are the encoder's mean-pooled normed patch tokens
    feats, _, _ = extract_features(ijepa_encoder, "builtin:fashion-mnist", "val", limit=8, pool="auto",
                                   cache_dir=tmp_path / "lin" / "feature_cache")
    model = load_encoder(ijepa_encoder)
    from mimbench.data import build_dataset

    images = torch.stack([build_dataset("builtin:fashion-mnist", "val", transform=None, img_size=28)[i][0]
                          for i in range(8)])
    with torch.no_grad():
        want = model.forward_features(images).mean(dim=1)
    assert np.allclose(np.asarray(feats), want.numpy(), atol=1e-5)
    with pytest.raises(MimbenchError, match="no class token"):
        run_eval("linear", encoder=ijepa_encoder, config="eval_configs/demo/linear_fmnist.py",
                 data="builtin:fashion-mnist", out=tmp_path / "cls", overrides=SMALL, pool="cls")


@pytest.mark.parametrize("which", ["reg_encoder", "ijepa_encoder"])
def test_eval_finetune_on_registers_and_no_class_token(which, request, tmp_path):
    encoder = request.getfixturevalue(which)
    record = run_eval("finetune", encoder=encoder, config="eval_configs/demo/finetune_fmnist.py",
                      data="builtin:fashion-mnist", out=tmp_path,
                      overrides=["data.limit_train=32", "data.limit_val=16", "optim.batch_size=16",
                                 "schedule.epochs=1", "schedule.warmup_epochs=0"])
    assert 0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 100
    assert "register tokens excluded" in record["protocol"]["feature"]
    ck = torch.load(tmp_path / "checkpoint-latest.pt", weights_only=True)["model"]
    assert ck["head.weight"].shape == (10, 32)
    assert ("reg_token" in ck) == (which == "reg_encoder") and ("cls_token" in ck) == (which == "reg_encoder")


def test_linear_protocol_mode_reads_cls_and_patch_mean(reg_encoder, tmp_path):
    record = run_eval("linear", encoder=reg_encoder, config="eval_configs/demo/linear_fmnist.py",
                      data="builtin:fashion-mnist", out=tmp_path, pool="cls+avg",
                      overrides=["data.limit_train=32", "data.limit_val=16", "optim.batch_size=16", "mode=protocol",
                                 "schedule.epochs=1", "schedule.warmup_epochs=0"])
    assert record["protocol"]["pool"] == "cls+avg" and "⊕" in record["protocol"]["feature"]
    ck = torch.load(tmp_path / "checkpoint-latest.pt", weights_only=True)["model"]
    assert ck["1.weight"].shape == (10, 64)  # the head reads 2D features


def test_finetune_layer_decay_treats_registers_and_layer_scale_as_timm_does(reg_encoder):
    from mimbench.evals.finetune import build_model, build_optimizer

    model = build_model(reg_encoder, 10, img_size=None, drop_path=0.0)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5, fast=False)
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    reg, cls, gamma = where[id(model.reg_token)], where[id(model.cls_token)], where[id(model.blocks[0].ls1.gamma)]
    assert reg is cls and reg["weight_decay"] == 0.0  # the stem: layer 0, no weight decay
    assert reg["lr_scale"] == pytest.approx(0.5 ** 3)  # depth 2: stem 0, blocks 1-2, head 3
    assert gamma["weight_decay"] == 0.0 and gamma["lr_scale"] == pytest.approx(0.5 ** 2)  # block 0 -> layer 1
