"""The random-initialisation control (`mimbench control`) and the step runner's use of it."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from mimbench.cli import app
from mimbench.control import build_control, control_sha256, is_control
from mimbench.encoders import load_encoder, read_metadata, save_encoder
from mimbench.errors import MimbenchError
from mimbench.paths import pretrain_config
from mimbench.steps import Control, Evaluate, StepRunner

MICRO = pretrain_config("mae_micro_fmnist.py")


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_control_from_a_config_is_what_pre_training_starts_from(tmp_path):
    from mimbench.config import load_config
    from mimbench.engine import seed_everything
    from pretrain import create_model

    path = build_control(tmp_path / "c.safetensors", config=MICRO)
    meta = read_metadata(path)
    assert meta["technique"] == "random-init" and float(meta["epochs"]) == 0.0 and meta["data"] == "none"
    # pretrain.main seeds with the config's runtime.seed (0) and then builds the model
    cfg = load_config(MICRO)
    kwargs = dict(cfg.model)
    seed_everything(int(cfg.runtime.seed))
    start = create_model(kwargs.pop("name"), **kwargs).encoder_state_dict()
    weights = _weights(path)
    assert weights.keys() == start.keys() and all(torch.equal(weights[k], start[k]) for k in start)


def test_control_like_an_encoder_matches_the_control_of_its_config(tmp_path):
    # an MAE encoder's initialisation does not depend on the decoder, so --like (smallest decoder) and --config
    # (the config's decoder) give the same weights at the same seed
    by_config = build_control(tmp_path / "a.safetensors", config=MICRO, seed=3)
    by_like = build_control(tmp_path / "b.safetensors", like=by_config, seed=3)
    a, b = _weights(by_config), _weights(by_like)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other_seed = _weights(build_control(tmp_path / "c.safetensors", like=by_config, seed=4))
    assert not torch.equal(other_seed["blocks.0.attn.qkv.weight"], a["blocks.0.attn.qkv.weight"])
    model = load_encoder(by_like)
    assert model.embed_dim == int(read_metadata(by_config)["embed_dim"])


def test_a_control_is_recognised_only_for_its_own_recipe(tmp_path):
    path = build_control(tmp_path / "c.safetensors", config=MICRO, overrides=["schedule.epochs=1"])
    assert is_control(path, config=MICRO, overrides=["schedule.epochs=1"])
    assert not is_control(path, config=MICRO)  # other overrides
    assert not is_control(path, config=MICRO, overrides=["schedule.epochs=1"], seed=1)
    assert not is_control(tmp_path / "missing.safetensors", config=MICRO)
    assert control_sha256(config=MICRO) != control_sha256(like=path)


def test_control_needs_exactly_one_source_and_a_vit_to_copy(tmp_path):
    with pytest.raises(MimbenchError, match="exactly one"):
        build_control(tmp_path / "x.safetensors")
    with pytest.raises(MimbenchError, match="exactly one"):
        build_control(tmp_path / "x.safetensors", config=MICRO, like=tmp_path / "y.safetensors")
    import timm

    from mimbench.encoders.beit import beit_metadata

    beit = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64,
                             depth=2, num_heads=2, num_classes=0, global_pool="token")
    flags = dict(use_abs_pos_emb=False, use_rel_pos_bias=True, use_shared_rel_pos_bias=False,
                 layer_scale_init_value=0.1)
    weights = {k: v for k, v in beit.state_dict().items() if not k.endswith("relative_position_index")}
    other = save_encoder(weights, tmp_path / "other.safetensors", arch="vit-d64x2/8", img_size=32, patch_size=8,
                         embed_dim=64, depth=2, num_heads=2, technique="beit", family="beit",
                         extra=beit_metadata(flags))
    with pytest.raises(MimbenchError, match="--config"):
        build_control(tmp_path / "z.safetensors", like=other)


def test_cli_control_writes_a_loadable_encoder_and_refuses_set_without_config(tmp_path):
    runner = CliRunner()
    out = tmp_path / "ctl" / "encoder.safetensors"
    result = runner.invoke(app, ["control", "--config", str(MICRO), "--set", "schedule.epochs=3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert is_control(out, config=MICRO, overrides=["schedule.epochs=3"])
    like = runner.invoke(app, ["control", "--like", str(out), "--out", str(tmp_path / "l.safetensors")])
    assert like.exit_code == 0, like.output
    bad = runner.invoke(app, ["control", "--like", str(out), "--set", "a=1", "--out", str(tmp_path / "m.safetensors")])
    assert bad.exit_code == 2 and "--config" in bad.output


def test_runner_builds_a_control_like_an_earlier_encoder_and_reuses_it(tmp_path):
    ref = build_control(tmp_path / "ref.safetensors", config=MICRO, seed=7)
    lines = []
    runner = StepRunner(tmp_path / "run", log=lines.append, header=lambda text: None)
    runner.encoders["mae"] = ref
    (first,) = runner.run([Control("random-init", like="mae")])
    assert not first.reused and is_control(first.path, like=ref)
    again = StepRunner(tmp_path / "run", log=lines.append, header=lambda text: None)
    again.encoders["mae"] = ref
    (second,) = again.run([Control("random-init", like="mae")])
    assert second.reused and lines[-1].startswith("reusing")
    # the same control asked with another seed is redone in place
    third = StepRunner(tmp_path / "run", log=lines.append, header=lambda text: None)
    third.encoders["mae"] = ref
    (redone,) = third.run([Control("random-init", like="mae", seed=1)])
    assert not redone.reused and lines[-1].startswith("redoing")
    with pytest.raises(MimbenchError, match="no earlier step"):
        StepRunner(tmp_path / "x", log=lines.append).run([Control("c", like="nothing")])
    with pytest.raises(MimbenchError, match="no earlier step"):
        StepRunner(tmp_path / "x", log=lines.append).run([Evaluate("nothing", "knn", MICRO)])
    with pytest.raises(MimbenchError, match="Unknown evaluation task"):
        Evaluate("mae", "probe", MICRO)


def test_control_of_a_beit_v2_config_is_a_beit_family_encoder(tmp_path):
    # The control of a BEiT v2 config is the BEiT-family encoder pre-training starts from (relative
    # position bias, layer scale): written with the family's metadata, readable by every evaluation.
    from pretrain.models.vqkd import VQKD

    tok = VQKD(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_depth=1, num_tokens=16,
               code_dim=8, teacher_dim=24)
    tok_path = tok.save(tmp_path / "tokenizer.safetensors", technique="vqkd")
    cfg = tmp_path / "beit.py"
    cfg.write_text(f"_base_ = [{str(pretrain_config('beitv2_micro_fmnist.py'))!r}]\n"
                   f"model = dict(tokenizer={str(tok_path)!r})\n")
    path = build_control(tmp_path / "c.safetensors", config=cfg)
    meta = read_metadata(path)
    assert meta["family"] == "beit" and meta["technique"] == "random-init"
    assert meta["use_shared_rel_pos_bias"] == "true" and float(meta["layer_scale_init_value"]) == 0.1
    model = load_encoder(path, global_pool="avg", fc_norm=True, num_classes=10)
    assert type(model).__name__ == "Beit" and model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # a tokenizer config has no encoder to start from
    tok_cfg = tmp_path / "vqkd.py"
    tok_cfg.write_text(f"_base_ = [{str(pretrain_config('vqkd_micro_fmnist.py'))!r}]\n"
                       "model = dict(teacher=None, teacher_dim=32)\n")
    with pytest.raises(MimbenchError, match="not an encoder"):
        build_control(tmp_path / "t.safetensors", config=tok_cfg)
