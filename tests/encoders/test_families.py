"""The encoder-family table, the import structure of mimbench.encoders, and the layout given as an argument."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import timm
import torch

import mimbench.encoders as encoders
from mimbench.encoders import (FAMILY_TABLE, convert_checkpoint, encoder_family, family_of, family_of_model,
                               load_encoder, read_metadata)
from mimbench.errors import MimbenchError

PACKAGE = Path(encoders.__file__).parent
SMALL = ["data.limit_train=32", "data.limit_val=16", "optim.batch_size=16", "schedule.epochs=1",
         "schedule.warmup_epochs=0"]


TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=0)


def _beit_code_checkpoint(path: Path) -> Path:
    """A BEiT-code checkpoint without lm_head / cls_pt_*: BEiT, BEiT v2 and data2vec share its keys (ambiguous)."""
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", global_pool="token", use_shared_rel_pos_bias=True,
                              use_rel_pos_bias=False, **TINY)
    torch.save({"model": model.state_dict() | {"mask_token": torch.zeros(1, 1, 64)}, "epoch": 799}, path)
    return path


def _vit_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(timm.models.vision_transformer.VisionTransformer(**TINY).state_dict(), path)
    return path


def _dinov3_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_dinov3", **(TINY | dict(embed_dim=64, num_heads=1)))
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def family_files(tmp_path_factory):
    """One encoder file per family: name -> path."""
    tmp = tmp_path_factory.mktemp("families")
    return {"vit": convert_checkpoint(_vit_checkpoint(tmp / "v.pth"), tmp / "v.safetensors"),
            "beit": convert_checkpoint(_beit_code_checkpoint(tmp / "b.pth"), tmp / "b.safetensors", layout="beit"),
            "eva": convert_checkpoint(_dinov3_checkpoint(tmp / "e.pth"), tmp / "e.safetensors")}


# ---------------------------------------------------------------- the table
def test_every_family_has_an_entry_and_a_file(family_files):
    assert set(FAMILY_TABLE) == set(family_files) == set(encoders.FAMILIES)


@pytest.mark.parametrize("name", sorted(FAMILY_TABLE))
def test_entry_describes_the_model_load_encoder_builds(family_files, name):
    entry = FAMILY_TABLE[name]
    meta = read_metadata(family_files[name])
    assert encoder_family(meta) == name and family_of(meta) is entry
    assert all(k in meta for k in entry.fields)
    model = load_encoder(family_files[name])
    assert type(model) is entry.timm_class and family_of_model(model) is entry
    assert model.global_pool == entry.global_pool
    # the shapes the file format checks are exactly the model's parameters (buffers such as relative_position_index
    # are rebuilt by timm and not stored)
    arch = encoders.arch.parse_arch(meta)
    want = entry.shapes(arch, entry.parse(meta, "test"), 3)
    assert {k: tuple(p.shape) for k, p in model.named_parameters()} == want


def test_unknown_family_is_refused_everywhere(family_files, tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(MimbenchError, match="unknown encoder family 'hiera'"):
        family_of({"family": "hiera"})
    meta = dict(read_metadata(family_files["vit"]), family="hiera")
    save_file(load_file(str(family_files["vit"])), str(tmp_path / "hiera.safetensors"), metadata=meta)
    with pytest.raises(MimbenchError, match="(?s)unknown encoder family 'hiera'.*update mimbench"):
        load_encoder(tmp_path / "hiera.safetensors")
    with pytest.raises(MimbenchError, match="not a model of any encoder family"):
        family_of_model(torch.nn.Linear(2, 2))


def test_fine_tuning_groups_parameters_with_the_entry(family_files, monkeypatch):
    from mimbench.evals.finetune import build_model, build_optimizer

    calls = []

    def grouping(model, *, weight_decay, layer_decay):
        calls.append((type(model).__name__, weight_decay, layer_decay))
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]

    monkeypatch.setitem(FAMILY_TABLE, "beit", dataclasses.replace(FAMILY_TABLE["beit"], layer_decay_groups=grouping))
    model = build_model(family_files["beit"], 3, img_size=None, drop_path=0.0)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.65)
    assert calls == [("Beit", 0.05, 0.65)] and len(opt.param_groups) == 1


def test_segmentation_backbone_is_the_one_the_entry_names(family_files, monkeypatch):
    from mimbench.seg import backbone

    for name, path in family_files.items():
        meta = read_metadata(path)
        if FAMILY_TABLE[name].mmseg_backbone is None:
            with pytest.raises(MimbenchError, match=f"Segmentation does not support {name} encoders"):
                backbone.mmseg_builder(meta)
            continue
        assert backbone.mmseg_builder(meta) is getattr(backbone, FAMILY_TABLE[name].mmseg_backbone)
    meta = read_metadata(family_files["beit"])  # no absolute position embedding: mmseg's BEiT backbone
    assert backbone.backbone_cfg_from_metadata(meta, 32)["type"] == "BEiT"
    assert backbone.backbone_cfg_from_metadata(read_metadata(family_files["vit"]), 32)["type"] == "MAE"
    monkeypatch.setitem(FAMILY_TABLE, "beit", dataclasses.replace(FAMILY_TABLE["beit"], mmseg_backbone=None))
    state, meta = encoders.open_encoder(family_files["beit"])
    with pytest.raises(MimbenchError, match="Segmentation does not support beit encoders"):
        backbone.encoder_to_backbone(state, meta, 32)


# ---------------------------------------------------------------- module structure
def _encoder_imports(path: Path) -> tuple[set[str], list[str]]:
    """(mimbench.encoders modules ``path`` imports anywhere, names imported inside functions)."""
    tree = ast.parse(path.read_text())
    found, inner = set(), []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner += [n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
                      for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    for node in ast.walk(tree):
        names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                 else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        if isinstance(node, ast.ImportFrom) and node.module == "mimbench.encoders":
            names = [f"mimbench.encoders.{a.name}" for a in node.names]
        found |= {n.split(".")[2] for n in names if n.startswith("mimbench.encoders.")}
    return found - {path.stem}, inner


def test_encoder_modules_import_without_cycles_and_at_the_top():
    graph, inner = {}, {}
    for path in PACKAGE.glob("*.py"):
        if path.stem != "__init__":
            graph[path.stem], inner[path.stem] = _encoder_imports(path)
    done: list[str] = []
    while len(done) < len(graph):  # topological order: each round takes the modules whose imports are all done
        ready = [m for m in graph if m not in done and graph[m] <= set(done)]
        assert ready, f"import cycle among {sorted(set(graph) - set(done))}: { {m: graph[m] for m in graph} }"
        done += ready
    # inside functions only the optional/heavy scipy (the relative-position spline)
    assert {m: i for m, i in inner.items() if i} == {"resample": ["scipy.interpolate"]}


# ---------------------------------------------------------------- layout as an argument
def test_evaluations_take_the_layout_as_an_argument(tmp_path):
    from mimbench.evals import run_eval

    src = _beit_code_checkpoint(tmp_path / "ambiguous.pt")
    with pytest.raises(MimbenchError, match="beit, beitv2, data2vec-vision"):
        run_eval("linear", encoder=src, config="eval_configs/demo/linear_fmnist.py", data="builtin:fashion-mnist",
                 out=tmp_path / "lin0", overrides=SMALL)
    lin = run_eval("linear", encoder=src, config="eval_configs/demo/linear_fmnist.py", data="builtin:fashion-mnist",
                   out=tmp_path / "lin", overrides=SMALL, layout="data2vec-vision")
    assert (lin["encoder"]["layout"], lin["encoder"]["technique"]) == ("data2vec-vision", "data2vec")
    ft = run_eval("finetune", encoder=src, config="eval_configs/demo/finetune_fmnist.py", data="builtin:fashion-mnist",
                  out=tmp_path / "ft", overrides=SMALL, layout="beitv2")
    assert (ft["encoder"]["layout"], ft["encoder"]["technique"]) == ("beitv2", "beitv2")


def test_segmentation_backbone_reads_the_layout_given(tmp_path):
    from mimbench.seg.backbone import write_backbone_checkpoint

    src = _beit_code_checkpoint(tmp_path / "ambiguous.pt")
    with pytest.raises(MimbenchError, match="--from"):
        write_backbone_checkpoint(src, tmp_path / "a.pth", 32)
    _, fields = write_backbone_checkpoint(src, tmp_path / "b.pth", 32, layout="beit")
    assert fields["type"] == "BEiT" and (tmp_path / "b.pth").is_file()
