"""transformers' DINOv3ViTModel (layout ``hf-dinov3``): a save_pretrained folder and its weights file alone load as
Eva-family encoders with the model's own tokens and pooled features (fp32, CPU, within 1e-5), config.json being the
source of eps, heads, image size and rotary base; a config that disagrees with the weights is refused."""
from __future__ import annotations

import json

import pytest
import torch

from mimbench.encoders import convert_state, load_encoder
from mimbench.encoders.convert import detect_layouts
from mimbench.errors import MimbenchError

transformers = pytest.importorskip("transformers")  # optional: the reference implementation of DINOv3ViTModel

TOL = dict(rtol=1e-5, atol=1e-5)
IMG = 32


def _model(tmp_path, gated: bool, **kw):
    """A perturbed tiny DINOv3ViTModel saved by save_pretrained under tmp_path/hf; returns (model, folder)."""
    config = transformers.DINOv3ViTConfig(**(dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, patch_size=8,
        image_size=IMG, num_register_tokens=2, use_gated_mlp=gated, hidden_act="silu" if gated else "gelu",
        layer_norm_eps=1e-6, rope_theta=50.0) | kw))
    torch.manual_seed(0)
    model = transformers.DINOv3ViTModel(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(tmp_path / "hf")
    return model.eval(), tmp_path / "hf"


def _same(model, enc):
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(pixel_values=x)
        torch.testing.assert_close(enc.forward_features(x), out.last_hidden_state, **TOL)  # normed tokens
        torch.testing.assert_close(enc(x), out.pooler_output, **TOL)


@pytest.mark.parametrize("gated", [False, True])
def test_folder_loads_with_the_features_of_transformers(tmp_path, gated):
    model, folder = _model(tmp_path, gated)
    enc = load_encoder(folder)
    meta = enc.mimbench_metadata
    assert (meta["family"], meta["source_layout"], meta["technique"]) == ("eva", "hf-dinov3", "dinov3")
    assert (meta["norm_eps"], meta["rope_temperature"], meta["num_heads"], meta["img_size"]) == \
        ("1e-06", "50.0", "2", str(IMG))  # from config.json, not the defaults (1e-5, 100, 224)
    assert (meta["num_reg_tokens"], meta["swiglu_mlp"]) == ("2", "true" if gated else "false")
    assert "config.json+weights: hidden_size=64" in meta["source_read"]
    assert f"config.json: hidden_act={'silu' if gated else 'gelu'}" in meta["source_read"]
    _same(model, enc)
    # --from hf-dinov3 forces the same reading
    assert convert_state(folder, "hf-dinov3")[1]["source_layout"] == "hf-dinov3"


@pytest.mark.parametrize("gated", [False, True])
def test_weights_file_alone_loads_with_transformers_defaults(tmp_path, gated):
    # the defaults a weights file alone gets: eps 1e-5, rope base 100, 64-dim heads (one head at width 64)
    model, folder = _model(tmp_path, gated, num_attention_heads=1, layer_norm_eps=1e-5, rope_theta=100.0,
                           num_register_tokens=0)
    weights = folder / "model.safetensors"
    assert detect_layouts(dict.fromkeys(json.loads(weights.read_bytes()[8:8 + int.from_bytes(
        weights.read_bytes()[:8], "little")]))) == ["hf-dinov3"]
    enc = load_encoder(weights, img_size=IMG)
    meta = enc.mimbench_metadata
    assert meta["source_layout"] == "hf-dinov3" and meta["num_reg_tokens"] == "0"
    assert "transformers default: " in meta["source_read"] and "layer_norm_eps=1e-05" in meta["source_read"]
    assert ("DINOv3 gated-MLP default: hidden_act=silu" in meta["source_read"]) == gated
    _same(model, enc)


@pytest.mark.parametrize("field,value", [("hidden_size", 32), ("num_hidden_layers", 3), ("intermediate_size", 128),
                                         ("num_register_tokens", 4), ("use_gated_mlp", True), ("patch_size", 16)])
def test_config_that_disagrees_with_the_weights_is_refused(tmp_path, field, value):
    _, folder = _model(tmp_path, False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {field: value}))
    with pytest.raises(MimbenchError, match=f"config.json says {field}={value!r} but the weights imply"):
        load_encoder(folder)


def test_a_key_bias_is_refused(tmp_path):
    _, folder = _model(tmp_path, False, key_bias=True)
    with pytest.raises(MimbenchError, match="key_bias"):
        load_encoder(folder)


def test_cli_convert_and_info_with_from_hf_dinov3(tmp_path):
    from typer.testing import CliRunner

    from mimbench.cli import app

    model, folder = _model(tmp_path, True)
    runner = CliRunner()
    weights = folder / "model.safetensors"
    result = runner.invoke(app, ["convert", str(weights), str(tmp_path / "e.safetensors"), "--from", "hf-dinov3"])
    assert result.exit_code == 0, result.output
    enc = load_encoder(tmp_path / "e.safetensors", img_size=IMG)
    assert enc.mimbench_metadata["source_layout"] == "hf-dinov3"
    info = runner.invoke(app, ["info", str(folder), "--from", "hf-dinov3"])
    assert info.exit_code == 0 and "hf-dinov3" in info.output, info.output
    wrong = runner.invoke(app, ["info", str(folder), "--from", "hf-dinov2"])  # forced onto the wrong layout
    assert wrong.exit_code == 2 and "no place in a ViT encoder" in wrong.output  # a clear error, nothing loaded


def test_eval_knn_runs_on_a_dinov3_folder_with_dinov3s_pooling(tmp_path):
    from typer.testing import CliRunner

    from mimbench.cli import app

    _, folder = _model(tmp_path, False)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "knn", "--encoder", str(folder), "--out", str(out),
                                      "--set", "data.limit_train=100", "--set", "data.limit_val=20"])
    assert result.exit_code == 0, result.output
    (record_path,) = out.glob("knn-*.json")
    record = json.loads(record_path.read_text())
    assert (record["encoder"]["layout"], record["encoder"]["family"]) == ("hf-dinov3", "eva")
    assert record["protocol"]["pool"] == "cls"  # DINOv3's k-NN reads the normed class token
