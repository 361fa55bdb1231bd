"""Every pre-training config loads, names a registered model that builds, and the paper configs carry
the official MAE recipe."""
import glob
import os

import pytest
import torch

from mimbench.config import load_config
from pretrain import create_model
from pretrain.main import resolve_batch

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "pretrain", "configs")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "*.py")))


def test_expected_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"mae_tiny_fmnist.py", "robust-mae_tiny_fmnist.py", "ddae_tiny_fmnist.py", "mae-dds_tiny_fmnist.py",
            "mae_micro_fmnist.py", "mae_vit-b_in1k_1600ep.py", "mae_vit-b_in1k_800ep.py", "mae_vit-l_in1k_1600ep.py",
            "robust-mae_vit-b_in1k_800ep.py", "ddae_vit-b_in1k_100ep.py", "ddae_vit-b_in1k_800ep.py",
            "mae-dds_vit-b_in1k_800ep.py", "robust-mae_micro_fmnist.py", "ddae_micro_fmnist.py",
            "mae-dds_micro_fmnist.py", "vqkd_micro_fmnist.py", "beitv2_micro_fmnist.py", "beitv2-dds_micro_fmnist.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_builds(path):
    cfg = load_config(path)
    kwargs = dict(cfg.model)
    name = kwargs.pop("name")
    with torch.device("meta"):
        if "tokenizer" in kwargs:  # BEiT v2: a stand-in tokenizer with the config's token grid
            from pretrain.models.vqkd import VQKD

            size = cfg.data.img_size
            patch = 16 if size == 224 else 4
            kwargs["tokenizer"] = VQKD(img_size=size, patch_size=patch, embed_dim=64, depth=1, num_heads=1,
                                       decoder_depth=1, num_tokens=64, code_dim=8, teacher_dim=32)
        if "teacher" in kwargs:  # VQ-KD: no teacher file needed to build it
            kwargs["teacher"], kwargs["teacher_dim"] = None, 32
        model = create_model(name, **kwargs)
    assert model.encoder_arch()["img_size"] == cfg.data.img_size
    assert cfg.schedule.warmup_epochs < cfg.schedule.epochs
    assert cfg.technique in ("mae", "robust-mae", "ddae", "mae+dds", "beitv2", "beitv2+dds", "vqkd")


@pytest.mark.parametrize("name", ["mae_vit-b_in1k_1600ep.py", "mae_vit-l_in1k_1600ep.py"])
def test_paper_configs_match_official_mae(name):
    cfg = load_config(os.path.join(ROOT, name))
    assert cfg.optim.blr == 1.5e-4 and cfg.optim.weight_decay == 0.05 and tuple(cfg.optim.betas) == (0.9, 0.95)
    assert resolve_batch(cfg.optim, 64)[2] == 4096 and resolve_batch(cfg.optim, 8)[2] == 4096
    assert cfg.schedule.epochs == 1600 and cfg.schedule.warmup_epochs == 40 and cfg.schedule.min_lr == 0.0
    assert cfg.runtime.mask_ratio == 0.75 and cfg.model.target_norm == "patch" and cfg.data.img_size == 224
