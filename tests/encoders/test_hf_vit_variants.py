"""Hugging Face DINOv2, DINOv2-with-registers and I-JEPA folders (save_pretrained) read through the HF table:
load_encoder(DIR) gives transformers' own pooled features (fp32, CPU, within 1e-5), a weights file alone is
recognised, and such encoders are exported as the class they were read from, not as a ViTModel that would drop
what it cannot hold."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mimbench.encoders import detect_layouts, load_encoder, read_metadata
from mimbench.encoders.hf import HF_ARCHITECTURES, HF_CLASSES
from mimbench.errors import MimbenchError
from mimbench.evals.features import pool_tokens, resolve_pool
from mimbench.export import export

transformers = pytest.importorskip("transformers")  # optional: the reference implementation of these layouts

TOL = 1e-5
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)
CASES = {
    "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(**SIZES, layerscale_value=0.5)),
    "dinov2-registers": lambda: transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
        **SIZES, num_register_tokens=4, layerscale_value=0.5)),
    "ijepa": lambda: transformers.IJepaModel(transformers.IJepaConfig(**SIZES, intermediate_size=96)),
}
MODEL_TYPE = {"dinov2": "dinov2", "dinov2-registers": "dinov2_with_registers", "ijepa": "ijepa"}


def _hf_model(kind):
    torch.manual_seed(0)
    model = CASES[kind]()
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial values everywhere (unit norms, zero biases ...), so a mis-mapped tensor shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _x():
    return torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))


def _pooled(enc, x):
    with torch.no_grad():
        return pool_tokens(enc, enc.forward_features(x), resolve_pool("auto", enc.mimbench_metadata))


@pytest.mark.parametrize("kind", list(CASES))
def test_save_pretrained_folder_gives_the_transformers_pooled_features(tmp_path, kind):
    assert HF_ARCHITECTURES[MODEL_TYPE[kind]][0] == f"hf-{kind}" and MODEL_TYPE[kind] in HF_CLASSES
    model = _hf_model(kind)
    model.save_pretrained(tmp_path / "hf")
    x = _x()
    with torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state
    want = tokens.mean(dim=1) if kind == "ijepa" else tokens[:, 0]  # I-JEPA: no class token, no registers
    enc = load_encoder(tmp_path / "hf")
    got = _pooled(enc, x)
    assert got.shape == want.shape and torch.allclose(got, want, atol=TOL, rtol=0), (got - want).abs().max()
    meta = read_metadata(tmp_path / "hf")
    assert meta["source_layout"] == f"hf-{kind}"
    assert meta["technique"] == ("ijepa" if kind == "ijepa" else "dinov2")
    assert meta["source_dropped"] == ("" if kind == "ijepa" else "embeddings(1)")  # the mask token
    if kind == "dinov2-registers":
        assert (meta["reg_tokens"], meta["no_embed_class"]) == ("4", "true")
    if kind == "ijepa":
        assert (meta["class_token"], meta["global_pool"]) == ("false", "avg")
    # the weights file alone says which architecture it is, though only config.json says the rest
    keys = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert detect_layouts(keys) == [f"hf-{kind}"]


def test_registers_are_not_pooled_from_an_hf_folder(tmp_path):
    model = _hf_model("dinov2-registers")
    model.save_pretrained(tmp_path / "hf")
    enc = load_encoder(tmp_path / "hf")
    x = _x()
    with torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state  # class token, 4 registers, 4 patches
        got = pool_tokens(enc, enc.forward_features(x), "avg")
    assert tokens.shape[1] == 1 + 4 + 4 and enc.num_prefix_tokens == 5
    assert torch.allclose(got, tokens[:, 5:].mean(dim=1), atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", list(CASES))
def test_export_writes_the_class_it_was_read_from_not_a_vitmodel(tmp_path, kind):
    model = _hf_model(kind)
    model.save_pretrained(tmp_path / "hf")
    export(tmp_path / "hf", "hf", tmp_path / "out")  # a ViTModel would drop registers / layer scale / no-cls
    again = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(again) is type(model)
    x = _x()
    with torch.no_grad():
        want, got = model(pixel_values=x).last_hidden_state, again(pixel_values=x).last_hidden_state
    assert got.shape == want.shape and (got - want).abs().max().item() < TOL


def test_task_model_folder_reads_its_base_model(tmp_path):
    torch.manual_seed(0)
    model = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**SIZES, num_labels=3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    x = _x()
    with torch.no_grad():
        want = model.dinov2(pixel_values=x).last_hidden_state[:, 0]
    assert torch.allclose(_pooled(load_encoder(tmp_path / "hf"), x), want, atol=TOL, rtol=0)
    assert "classifier(2)" in read_metadata(tmp_path / "hf")["source_dropped"]


def test_export_to_mae_refuses_registers_and_layer_scale(tmp_path):
    _hf_model("dinov2").save_pretrained(tmp_path / "hf")  # eps 1e-6 as MAE's, but layer scale
    with pytest.raises(MimbenchError, match="init_values") as err:
        export(tmp_path / "hf", "mae", tmp_path / "enc.pth")
    assert "--to timm" in err.value.fix and not (tmp_path / "enc.pth").exists()
