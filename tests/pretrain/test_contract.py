"""The pre-training model contract: every registered model implements it, a model that does not is refused,
the config's spec agrees with the built model, and no two project modules import each other."""
import ast
import inspect
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from torch import nn

from mimbench.errors import MimbenchError
from pretrain.contract import MASK_INPUTS, PretrainModel, StepContract, VisualTokenizer, check_model
from pretrain.registry import create_model, list_models, model_spec

ROOT = Path(__file__).resolve().parents[2]


class GridTokenizer(VisualTokenizer):
    """A tokenizer of any grid (ids = patch index modulo the vocabulary): enough for BEiT v2 to be built."""

    def __init__(self, grid: int, num_tokens: int = 16) -> None:
        super().__init__()
        self.grid_size, self.num_tokens = (grid, grid), num_tokens

    def tokenize(self, imgs):
        return torch.arange(self.grid_size[0] ** 2).expand(imgs.shape[0], -1) % self.num_tokens


def _arguments(name: str) -> dict:
    if name.startswith("beitv2"):
        small = name.endswith("_32")  # the 8x8 presets mask 26 of 64 patches in their configs
        return {"tokenizer": GridTokenizer(8 if small else 14), **({"num_mask_patches": 26} if small else {})}
    if name.startswith("vqkd"):
        return {"teacher_dim": 8}
    return {}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_implements_the_contract(name):
    with torch.device("meta"):  # shapes only: the ViT-L/H presets cost no memory
        model = create_model(name, **_arguments(name))
    assert isinstance(model, PretrainModel) and check_model(model) is model
    assert model.mask_input in MASK_INPUTS
    # the declaration says how forward takes its mask
    params = inspect.signature(model.forward).parameters
    assert ("noise" in params) == (model.mask_input == "noise")
    assert ("mask" in params and callable(getattr(model, "draw_mask", None))) == (model.mask_input == "blocks")
    # the config's spec, known before building, is what the model exports
    spec = model_spec(Config(dict(technique=None, model=dict(name=name))))
    assert (spec.family, spec.exports, spec.export_name) == (model.encoder_family, model.exports, model.export_name)
    assert spec.export_name == f"{model.exports}.safetensors"
    arch = model.encoder_arch()
    assert {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"} <= set(arch)


def test_spec_technique_is_the_configs_or_the_registered_one():
    assert model_spec(Config(dict(technique=None, model=dict(name="ddae_vit_micro_patch4_32")))).technique == "ddae"
    assert model_spec(Config(dict(technique=None, model=dict(name="robust_mae")))).technique == "robust-mae"
    spec = model_spec(Config(dict(technique="mae (ablation)", model=dict(name="mae+dds", depth=2))))
    assert spec.technique == "mae (ablation)" and spec.kwargs == {"depth": 2} and spec.name == "mae+dds"
    with pytest.raises(MimbenchError, match="Unknown pre-training model"):
        model_spec(Config(dict(technique=None, model=dict(name="mae_vit_gigantic"))))


class NoExport(StepContract, nn.Module):
    mask_input = "noise"
    exports = "encoder"
    encoder_family = "vit"

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        return imgs.sum(), imgs, imgs


def test_a_model_missing_a_piece_is_refused_by_name():
    with pytest.raises(MimbenchError, match="lacks encoder_arch, encoder_state_dict, no_weight_decay"):
        check_model(NoExport())
    with pytest.raises(MimbenchError, match="lacks mask_input, exports, encoder_family"):
        check_model(nn.Linear(2, 2))

    class Complete(NoExport):
        def encoder_arch(self):
            return {}

        def encoder_state_dict(self):
            return {}

        def no_weight_decay(self):
            return set()

    assert check_model(Complete()) is not None
    Complete.mask_input = "random"
    with pytest.raises(MimbenchError, match="mask_input='random'.*\n.*noise, blocks, none"):
        check_model(Complete())
    Complete.mask_input, Complete.exports = "blocks", "encoder"
    with pytest.raises(MimbenchError, match="draw_mask"):
        check_model(Complete())


def _imports(path: Path, module: str) -> set[str]:
    """Project modules ``module`` imports anywhere in its file (inside functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in ("mimbench", "pretrain") and m != module}


def test_no_two_project_modules_import_each_other():
    modules = {}
    for pkg in ("mimbench", "pretrain"):
        for f in (ROOT / pkg).rglob("*.py"):
            if "configs" in f.parts:
                continue
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = f
    graph = {m: _imports(f, m) & set(modules) for m, f in modules.items()}
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())})
    assert [p for p in pairs if p[0].startswith("pretrain") or p[1].startswith("pretrain")] == []
