import pytest
import torch

from mimbench.config import load_config
from mimbench.evals import run_eval


def test_layer_decay_scales_of_vit_base():
    import timm

    from mimbench.evals.finetune import build_optimizer

    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10, global_pool="avg",
                              fc_norm=True)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.65)

    def layer_id(name):  # MAE util/lr_decay.py get_layer_id_for_vit, num_layers = 12 + 1
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return 13

    names = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            assert group["lr_scale"] == pytest.approx(0.65 ** (13 - layer_id(name)), rel=1e-12), name
            no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
            seen += 1
    assert seen == len(names)


def test_protocol_config_values():
    cfg = load_config("eval_configs/finetune/mae_vit-b_in1k.py")
    assert (cfg.optim.blr, cfg.optim.weight_decay, cfg.optim.layer_decay, cfg.optim.eff_batch_size) == \
        (5e-4, 0.05, 0.65, 1024)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.schedule.min_lr, cfg.model.drop_path) == \
        (100, 5, 1e-6, 0.1)
    assert (cfg.mixup.mixup, cfg.mixup.cutmix, cfg.mixup.smoothing) == (0.8, 1.0, 0.1)
    assert (cfg.augment.auto_augment, cfg.augment.re_prob, cfg.augment.re_mode) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel")
    large = load_config("eval_configs/finetune/mae_vit-l_in1k.py")
    assert (large.optim.blr, large.optim.layer_decay, large.model.drop_path, large.schedule.epochs) == \
        (1e-3, 0.75, 0.2, 50)
    huge = load_config("eval_configs/finetune/mae_vit-h_in1k.py")  # FINETUNE.md "Script for ViT-Huge"
    assert (huge.optim.blr, huge.optim.layer_decay, huge.optim.weight_decay, huge.model.drop_path) == \
        (1e-3, 0.75, 0.05, 0.3)
    assert (huge.schedule.epochs, huge.schedule.warmup_epochs, huge.optim.eff_batch_size, huge.mixup.cutmix) == \
        (50, 5, 1024, 1.0)


def test_finetune_demo_runs_and_records(tiny_encoder, tmp_path):
    record = run_eval("finetune", encoder=tiny_encoder, config="eval_configs/demo/finetune_fmnist.py",
                      data="builtin:fashion-mnist", out=tmp_path,
                      overrides=["data.limit_train=64", "data.limit_val=32", "optim.batch_size=16"])
    assert record["task"] == "finetune" and record["protocol"]["lr"] == pytest.approx(4e-3 * 16 / 256)  # demo blr
    assert any("random erasing" in d for d in record["protocol"]["deviations"])
    assert 0 <= record["metrics"]["top1"] <= record["metrics"]["top5"] <= 100
    ck = torch.load(tmp_path / "checkpoint-latest.pt", weights_only=True)
    assert ck["model"]["head.weight"].shape == (10, 32) and "fc_norm.weight" in ck["model"]
