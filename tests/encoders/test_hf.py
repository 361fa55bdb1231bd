"""Hugging Face folders in, Hugging Face and MAE files out: transformers' own models (save_pretrained) read by
load_encoder give their own features, and exported encoders give theirs back (fp32, CPU, within 1e-5)."""
from __future__ import annotations

import json
import pathlib
import re
from functools import partial

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from mimbench.cli import app
from mimbench.encoders import convert_checkpoint, detect_layouts, load_encoder, read_metadata
from mimbench.encoders.hf import HF_ARCHITECTURES
from mimbench.errors import MimbenchError
from mimbench.export import export
from mimbench.testing import perturb, write_tiny_encoder

import transformers  # noqa: E402  (the dev extra: the reference implementation of these layouts)

D, HEADS, DEPTH, IMG, PATCH = 128, 2, 2, 32, 8  # 64-dim heads: a weights file alone implies the head count
SIZES = dict(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=3 * D,
             image_size=IMG, patch_size=PATCH)
runner = CliRunner()


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m", "", text))



CASES = {
    "vit": lambda: transformers.ViTModel(transformers.ViTConfig(**SIZES)),
    "vit-no-qkv-bias": lambda: transformers.ViTModel(transformers.ViTConfig(**SIZES, qkv_bias=False)),
    "vitmae": lambda: transformers.ViTMAEModel(transformers.ViTMAEConfig(**SIZES, mask_ratio=0.0)),
    "beit-per-block": lambda: transformers.BeitModel(transformers.BeitConfig(
        **SIZES, use_mean_pooling=False, use_relative_position_bias=True)),
    "beit-abs-no-layer-scale": lambda: transformers.BeitModel(transformers.BeitConfig(
        **SIZES, use_mean_pooling=False, use_absolute_position_embeddings=True, layer_scale_init_value=0.0)),
    "data2vec-shared": lambda: transformers.Data2VecVisionModel(transformers.Data2VecVisionConfig(
        **SIZES, use_mean_pooling=False, use_shared_relative_position_bias=True)),
}
LAYOUT = {"vit": "hf-vit", "vit-no-qkv-bias": "hf-vit", "vitmae": "hf-vitmae", "beit-per-block": "hf-beit",
          "beit-abs-no-layer-scale": "hf-beit", "data2vec-shared": "hf-data2vec-vision"}


def _hf_model(case):
    torch.manual_seed(0)
    return perturb(CASES[case]())


def _x():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))


def _hf_cls(model, x):
    """The class token of last_hidden_state; ViTMAE with its patches kept in order and none masked."""
    kw = {"noise": torch.arange(x.shape[0] * (IMG // PATCH) ** 2, dtype=torch.float).view(x.shape[0], -1)} \
        if isinstance(model, transformers.ViTMAEModel) else {}
    with torch.no_grad():
        return model(pixel_values=x, **kw).last_hidden_state


def _assert_same(model, path, layout="auto"):
    enc = load_encoder(path, layout=layout)
    x = _x()
    want = _hf_cls(model, x)
    with torch.no_grad():
        tokens, cls = enc.forward_features(x), enc(x)
    assert (cls - want[:, 0]).abs().max().item() < 1e-5
    assert (tokens - want).abs().max().item() < 1e-5  # every token, in order (ViTMAE: noise keeps the order)
    return enc


@pytest.mark.parametrize("case", list(CASES))
def test_save_pretrained_folder_gives_the_transformers_features(tmp_path, case):
    model = _hf_model(case)
    model.save_pretrained(tmp_path / "m")
    enc = _assert_same(model, tmp_path / "m")
    meta = enc.mimbench_metadata
    assert meta["source_layout"] == LAYOUT[case]
    assert float(meta["norm_eps"]) == 1e-12  # from config.json, not timm's 1e-6
    assert "config.json: " in meta["source_read"] and "norm_eps=1e-12" in meta["source_read"]
    assert meta.get("family", "vit") == ("beit" if case.startswith(("beit", "data2vec")) else "vit")
    assert ("source_filled" in meta) == (case == "vit-no-qkv-bias")


@pytest.mark.parametrize("case", ["vit", "vitmae", "beit-per-block", "data2vec-shared"])
def test_weights_file_alone_gives_the_same_features(tmp_path, case):
    model = _hf_model(case)
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    found = detect_layouts(load_file(str(weights)))
    assert LAYOUT[case] in found
    if len(found) > 1:  # ViTModel without its pooler = ViTMAEModel; BeitModel = Data2VecVisionModel: --from
        with pytest.raises(MimbenchError, match="--from"):
            load_encoder(weights)
    enc = _assert_same(model, weights, layout=LAYOUT[case])
    assert "transformers default: " in enc.mimbench_metadata["source_read"]


def test_pytorch_model_bin_in_transformers_5_module_names(tmp_path):
    """A folder with pytorch_model.bin (read weights-only) holding state_dict() as transformers 5 names it."""
    model = _hf_model("vit")
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    assert any(k.startswith("layers.0.attention.q_proj") for k in model.state_dict())
    _assert_same(model, tmp_path / "m")


def test_config_json_is_the_source_of_truth_for_the_head_count(tmp_path):
    torch.manual_seed(0)
    model = perturb(transformers.ViTModel(transformers.ViTConfig(**{**SIZES, "num_attention_heads": 4})))
    model.save_pretrained(tmp_path / "m")
    assert _assert_same(model, tmp_path / "m").mimbench_metadata["num_heads"] == "4"
    alone = load_encoder(tmp_path / "m" / "model.safetensors")  # 64-dim heads without config.json: another model
    assert alone.mimbench_metadata["num_heads"] == "2"
    with torch.no_grad():
        assert (alone(_x()) - _hf_cls(model, _x())[:, 0]).abs().max().item() > 1e-3


def test_task_model_folder_reads_its_base_model(tmp_path):
    torch.manual_seed(0)
    model = perturb(transformers.ViTForImageClassification(transformers.ViTConfig(**SIZES, num_labels=5)))
    model.save_pretrained(tmp_path / "m")
    enc = load_encoder(tmp_path / "m")
    x = _x()
    with torch.no_grad():
        want = model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        want = model.vit.layernorm(want)[:, 0]
        assert (enc(x) - want).abs().max().item() < 1e-5
    assert "classifier(2)" in enc.mimbench_metadata["source_dropped"]


def _clip_folder(path):
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision)).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", ["clip", "resnet"])
def test_unsupported_architecture_names_what_was_found_and_what_is_supported(tmp_path, kind):
    if kind == "clip":
        folder = _clip_folder(tmp_path / "clip")
    else:
        folder = tmp_path / "resnet"
        transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])) \
            .save_pretrained(folder)
    with pytest.raises(MimbenchError) as e:
        load_encoder(folder)
    text = str(e.value)
    assert ("CLIPModel" if kind == "clip" else "ResNetModel") in text
    for model_type, (layout, _) in HF_ARCHITECTURES.items():
        assert model_type in text and layout in text
    result = runner.invoke(app, ["info", str(folder)])
    assert result.exit_code == 2 and "not a supported encoder architecture" in _plain(result.output)


@pytest.mark.parametrize("key,value,says", [("hidden_size", 64, "hidden_size=64"),
                                            ("num_hidden_layers", 3, "num_hidden_layers=3"),
                                            ("image_size", 64, "image_size=64"),
                                            ("intermediate_size", 100, "intermediate_size=100")])
def test_config_disagreeing_with_the_weights_is_an_error(tmp_path, key, value, says):
    _hf_model("vit").save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(MimbenchError, match=f"config.json says {says}"):
        load_encoder(tmp_path / "m")


def test_beit_with_mean_pooling_has_no_token_level_norm_and_is_refused(tmp_path):
    torch.manual_seed(0)
    transformers.BeitModel(transformers.BeitConfig(**SIZES, use_mean_pooling=True)).save_pretrained(tmp_path / "m")
    with pytest.raises(MimbenchError, match="use_mean_pooling"):
        load_encoder(tmp_path / "m")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would call Path.touch(marker)
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pytorch_model_bin_that_would_run_code_is_refused_unexecuted(tmp_path):
    _hf_model("vit").save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"embeddings.cls_token": torch.zeros(1, 1, D), "x": _RunsCode(str(marker))},
               tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(MimbenchError, match="refused for safety"):
        load_encoder(tmp_path / "m")
    assert not marker.exists()


def test_eval_knn_runs_on_an_hf_folder(tmp_path):
    model = _hf_model("vit")
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "run"
    result = runner.invoke(app, ["eval", "knn", "--encoder", str(tmp_path / "m"), "--out", str(out),
                                 "--set", "data.limit_train=100", "--set", "data.limit_val=20"])
    assert result.exit_code == 0, result.output
    (record_path,) = out.glob("knn-*.json")
    enc = json.loads(record_path.read_text())["encoder"]
    assert (enc["layout"], enc["family"]) == ("hf-vit", "vit")
    assert enc["dropped"] == "pooler(2)"

    # export --to hf of that folder: the model card lists the k-NN result found under --results
    result = runner.invoke(app, ["export", str(tmp_path / "m"), "--to", "hf", "--out", str(tmp_path / "hf"),
                                 "--results", str(out)])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| knn |" in card and "hf-vit" in card


def _beit_encoder(tmp_path):
    torch.manual_seed(0)
    model = perturb(timm.create_model("beit_base_patch16_224", pretrained=False, img_size=IMG, patch_size=PATCH,
                                       embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=0, global_pool="token",
                                       use_shared_rel_pos_bias=True, use_rel_pos_bias=False))
    torch.save({"model": model.state_dict()}, tmp_path / "beit.pth")
    return convert_checkpoint(tmp_path / "beit.pth", tmp_path / "beit.safetensors", layout="beit")


@pytest.mark.parametrize("family", ["vit", "beit"])
def test_export_to_hf_loads_in_transformers_with_the_same_features(tmp_path, family):
    enc = write_tiny_encoder(tmp_path / "vit.safetensors") if family == "vit" else _beit_encoder(tmp_path)
    mine = load_encoder(enc)
    export(enc, "hf", tmp_path / "hf")
    theirs = transformers.AutoModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    assert type(theirs).__name__ == ("ViTModel" if family == "vit" else "BeitModel")
    x = _x()
    with torch.no_grad():
        assert (theirs(pixel_values=x).last_hidden_state - mine.forward_features(x)).abs().max().item() < 1e-5
    back = read_metadata(tmp_path / "hf")  # and back again: the folder reads as the same encoder
    assert back["source_layout"] == ("hf-vit" if family == "vit" else "hf-beit")
    with torch.no_grad():
        assert (load_encoder(tmp_path / "hf")(x) - mine(x)).abs().max().item() < 1e-5
    card = (tmp_path / "hf" / "README.md").read_text()
    assert mine.mimbench_metadata["technique"] in card and "No run records" in card


def test_export_to_mae_loads_as_mae_finetuning_does(tmp_path):
    enc = write_tiny_encoder(tmp_path / "vit.safetensors")
    mine = load_encoder(enc)
    export(enc, "mae", tmp_path / "mae.pth")
    checkpoint = torch.load(tmp_path / "mae.pth", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"model"}
    # MAE's models_vit.VisionTransformer is timm's, eps 1e-6, with a fresh classifier head
    vit = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                            global_pool="token", norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    result = vit.load_state_dict(checkpoint["model"], strict=False)
    assert set(result.missing_keys) == {"head.weight", "head.bias"} and not result.unexpected_keys
    x = _x()
    with torch.no_grad():
        assert (vit.forward_features(x) - mine.forward_features(x)).abs().max().item() < 1e-5


def test_export_to_mae_refuses_what_mae_cannot_build(tmp_path):
    with pytest.raises(MimbenchError, match="ViTs only"):
        export(_beit_encoder(tmp_path), "mae", tmp_path / "b.pth")
    _hf_model("vit").save_pretrained(tmp_path / "m")
    with pytest.raises(MimbenchError, match="eps 1e-12"):
        export(tmp_path / "m", "mae", tmp_path / "v.pth")
    assert not (tmp_path / "b.pth").exists() and not (tmp_path / "v.pth").exists()


def test_export_to_timm_writes_the_encoder_file_of_an_hf_folder(tmp_path):
    model = _hf_model("beit-per-block")
    model.save_pretrained(tmp_path / "m")
    out = export(tmp_path / "m", "timm", tmp_path / "enc.safetensors")
    _assert_same(model, out)
    assert read_metadata(out)["source_layout"] == "hf-beit"


def test_convert_a_folder_with_from_forcing_the_layout(tmp_path):
    model = _hf_model("vitmae")
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "vit"}))
    result = runner.invoke(app, ["convert", str(tmp_path / "m"), str(tmp_path / "e.safetensors"), "--from", "hf-vitmae"])
    assert result.exit_code == 0, result.output
    meta = read_metadata(tmp_path / "e.safetensors")
    assert (meta["source_layout"], meta["technique"]) == ("hf-vitmae", "mae")
    _assert_same(model, tmp_path / "e.safetensors")
    assert read_metadata(tmp_path / "m")["source_layout"] == "hf-vit"  # auto: what config.json says
    wrong = runner.invoke(app, ["info", str(tmp_path / "m"), "--from", "mae"])
    assert wrong.exit_code == 2 and "does not apply" in _plain(wrong.output)
