from pathlib import Path

import pytest

import mimbench.seg  # noqa: F401  (mmcv.ops fallback before mmseg)

REPO = Path(__file__).resolve().parents[2]
ADE_CONFIG = REPO / "eval_configs" / "segmentation" / "upernet_vit-b_ade20k_512x512_160k.py"
ADE_LARGE_CONFIG = REPO / "eval_configs" / "segmentation" / "upernet_vit-l_ade20k_512x512_160k.py"


def _load(path=ADE_CONFIG):
    from mmengine.config import Config

    return Config.fromfile(str(path))


def test_ade20k_config_matches_published_protocol():
    # Values: mmsegmentation 1.2.2 configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py + _base_ files.
    cfg = _load()
    m = cfg.model
    b = m.backbone
    assert (b.type, b.img_size, b.patch_size, b.embed_dims, b.num_layers, b.num_heads, b.mlp_ratio) == (
        "MAE", (512, 512), 16, 768, 12, 12, 4)
    assert (b.init_values, b.drop_path_rate, b.norm_cfg.eps, list(b.out_indices)) == (1.0, 0.1, 1e-6, [3, 5, 7, 11])
    assert m.neck.type == "Feature2Pyramid" and list(m.neck.rescales) == [4, 2, 1, 0.5]
    d = m.decode_head
    assert (d.type, list(d.in_channels), d.channels, tuple(d.pool_scales), d.dropout_ratio, d.num_classes) == (
        "UPerHead", [768] * 4, 768, (1, 2, 3, 6), 0.1, 150)
    assert d.norm_cfg.type == "SyncBN" and d.loss_decode.loss_weight == 1.0
    a = m.auxiliary_head
    assert (a.type, a.in_index, a.channels, a.num_convs, a.num_classes, a.loss_decode.loss_weight) == (
        "FCNHead", 2, 256, 1, 150, 0.4)
    assert (m.test_cfg.mode, m.test_cfg.crop_size, m.test_cfg.stride) == ("slide", (512, 512), (341, 341))
    assert m.data_preprocessor.mean == [123.675, 116.28, 103.53] and m.data_preprocessor.bgr_to_rgb is True
    ow = cfg.optim_wrapper
    assert ow.type == "AmpOptimWrapper" and ow.loss_scale == "dynamic"  # real AMP (fp16= is ignored by mmseg 1.x)
    assert (ow.optimizer.type, ow.optimizer.lr, ow.optimizer.weight_decay, ow.optimizer.betas) == (
        "AdamW", 1e-4, 0.05, (0.9, 0.999))
    assert ow.constructor == "MimLayerDecayOptimizerConstructor"  # mmseg's, without decay on pos_embed etc.
    assert (ow.paramwise_cfg.num_layers, ow.paramwise_cfg.layer_decay_rate) == (12, 0.65)
    warm, poly = cfg.param_scheduler
    assert (warm.type, warm.start_factor, warm.begin, warm.end) == ("LinearLR", 1e-6, 0, 1500)
    assert (poly.type, poly.power, poly.eta_min, poly.begin, poly.end) == ("PolyLR", 1.0, 0.0, 1500, 160000)
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size == 2  # x 8 GPUs = 16
    tp = {t.type: t for t in cfg.train_dataloader.dataset.pipeline}
    assert tp["LoadAnnotations"].reduce_zero_label is True
    assert (tp["RandomResize"].scale, tp["RandomResize"].ratio_range) == ((2048, 512), (0.5, 2.0))
    assert (tp["RandomCrop"].crop_size, tp["RandomCrop"].cat_max_ratio) == ((512, 512), 0.75)
    assert tp["RandomFlip"].prob == 0.5 and "PhotoMetricDistortion" in tp
    assert cfg.val_dataloader.dataset.pipeline[1].scale == (2048, 512)
    assert cfg.val_evaluator.iou_metrics == ["mIoU"]


def test_ade20k_config_differs_from_installed_mmseg_only_where_documented():
    import mmseg
    from mmengine.config import Config

    ref_path = Path(mmseg.__file__).parent / ".mim/configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py"
    if not ref_path.is_file():
        pytest.skip("mmseg installed without its configs")
    ours, ref = _load().to_dict(), Config.fromfile(str(ref_path)).to_dict()
    differences = []

    def walk(x, y, path):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in set(x) | set(y):
                if k not in x or k not in y:
                    differences.append(path + k)
                else:
                    walk(x[k], y[k], path + k + ".")
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and len(x) == len(y):
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}{i}.")
        elif x != y:
            differences.append(path.rstrip("."))

    walk(ours, ref, "")
    # fp16/optimizer: legacy keys unused by mmseg 1.x; num_classes: a named variable here;
    # optim_wrapper: AmpOptimWrapper honours the intended AMP; pretrained: the encoder comes from --encoder;
    # constructor: mmseg's LayerDecayOptimizerConstructor with the BEiT/MAE weight-decay exclusions fixed;
    # data_preprocessor.test_cfg: test inputs smaller than the crop padded up to it (the MAE backbone takes
    # crop-sized windows only; without it the 0.5x multi-scale pass fails).
    assert sorted(differences) == sorted(
        ["fp16", "optimizer", "num_classes", "optim_wrapper.loss_scale", "optim_wrapper.type", "model.pretrained",
         "optim_wrapper.constructor", "data_preprocessor.test_cfg", "model.data_preprocessor.test_cfg"]
    )
    assert ours["model"]["data_preprocessor"]["test_cfg"] == {"size": (512, 512)}
    assert (ours["optim_wrapper"]["constructor"], ref["optim_wrapper"]["constructor"]) == (
        "MimLayerDecayOptimizerConstructor", "LayerDecayOptimizerConstructor")
    assert ours["optim_wrapper"]["paramwise_cfg"] == ref["optim_wrapper"]["paramwise_cfg"]


def test_ade20k_vit_large_config_takes_sizes_and_beit_large_recipe():
    # Values: microsoft/unilm beit/semantic_segmentation/configs/beit/upernet/
    # upernet_beit_large_24_512_slide_160k_ade20k.py; everything else inherited from the ViT-B file.
    cfg, base = _load(ADE_LARGE_CONFIG), _load()
    b = cfg.model.backbone
    assert (b.type, b.embed_dims, b.num_layers, b.num_heads, b.patch_size, b.mlp_ratio, list(b.out_indices)) == (
        "MAE", 1024, 24, 16, 16, 4, [7, 11, 15, 23])
    assert (b.drop_path_rate, b.init_values, b.img_size) == (0.2, 1.0, (512, 512))
    assert cfg.model.neck.embed_dim == 1024 and list(cfg.model.neck.rescales) == [4, 2, 1, 0.5]
    d, a = cfg.model.decode_head, cfg.model.auxiliary_head
    assert (list(d.in_channels), d.channels, d.num_classes, tuple(d.pool_scales)) == (
        [1024] * 4, 1024, 150, (1, 2, 3, 6))
    assert (a.in_channels, a.channels, a.in_index, a.loss_decode.loss_weight) == (1024, 256, 2, 0.4)
    ow = cfg.optim_wrapper
    assert (ow.type, ow.loss_scale, ow.constructor) == (
        "AmpOptimWrapper", "dynamic", "MimLayerDecayOptimizerConstructor")
    assert (ow.optimizer.type, ow.optimizer.lr, ow.optimizer.weight_decay, ow.optimizer.betas) == (
        "AdamW", 2e-5, 0.05, (0.9, 0.999))
    assert dict(ow.paramwise_cfg) == dict(num_layers=24, layer_decay_rate=0.95)
    warm, poly = cfg.param_scheduler
    assert (warm.type, warm.start_factor, warm.begin, warm.end) == ("LinearLR", 1e-6, 0, 1500)
    assert (poly.type, poly.power, poly.eta_min, poly.begin, poly.end) == ("PolyLR", 1.0, 0.0, 1500, 160000)
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size == 2  # x 8 GPUs = 16
    # data, test mode and runtime are the ViT-B protocol's
    for key in ("train_dataloader", "val_dataloader", "val_evaluator", "default_hooks", "data_preprocessor"):
        assert cfg[key] == base[key], key
    assert cfg.model.test_cfg == base.model.test_cfg


@pytest.mark.slow
def test_ade20k_segmentor_forward_backward_on_cpu():
    import torch
    from mmengine.registry import init_default_scope
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    cfg = _load()
    for head in (cfg.model.decode_head, cfg.model.auxiliary_head):
        head.norm_cfg = dict(type="BN", requires_grad=True)  # SyncBN needs a process group
    init_default_scope("mmseg")
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.train()
    # One image: BN over the 1x1 pooled PPM branch has a single value per channel in training mode
    # (the real run syncs BN over 8 GPUs x 2 images), so BN uses its running statistics here.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    img = torch.randint(0, 256, (3, 512, 512), dtype=torch.uint8)
    sample = SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, 150, (1, 512, 512))))
    sample.set_metainfo(dict(img_shape=(512, 512), ori_shape=(512, 512), pad_shape=(512, 512)))
    data = model.data_preprocessor(dict(inputs=[img], data_samples=[sample]), training=True)
    losses = model(**data, mode="loss")
    assert set(losses) >= {"decode.loss_ce", "aux.loss_ce"}
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    grad = model.backbone.layers[0].attn.qkv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
