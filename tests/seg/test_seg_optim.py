import warnings

import pytest
import torch

import mimbench.seg  # noqa: F401  (mmcv.ops fallback before mmseg; registers the constructor)

NUM_LAYERS, RATE, BASE_LR, WD = 4, 0.65, 0.1, 0.05
NO_DECAY_SUFFIXES = ("pos_embed", "cls_token", "relative_position_bias_table")


def _model():
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    torch.manual_seed(0)
    # The ADE20K config's MAE backbone (BEiT-style blocks with relative position bias), tiny.
    return MODELS.build(dict(
        type="EncoderDecoder",
        backbone=dict(type="MAE", img_size=(32, 32), patch_size=8, embed_dims=32, num_layers=NUM_LAYERS,
                      num_heads=2, mlp_ratio=4, out_indices=[1, 3], init_values=1.0,
                      norm_cfg=dict(type="LN", eps=1e-6)),
        decode_head=dict(type="FCNHead", in_channels=32, in_index=1, channels=8, num_convs=1, num_classes=3,
                         norm_cfg=dict(type="BN", requires_grad=True)),
    ))


def _optimizer(model, constructor):
    from mmengine.optim import build_optim_wrapper

    cfg = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=BASE_LR, betas=(0.9, 0.999), weight_decay=WD),
               constructor=constructor, paramwise_cfg=dict(num_layers=NUM_LAYERS, layer_decay_rate=RATE))
    return build_optim_wrapper(model, cfg).optimizer


def _settings(model, optimizer):
    """name -> (weight_decay, lr_scale, lr) of the one group holding that parameter."""
    owner = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in owner, "parameter in two groups"
            owner[id(p)] = (group["weight_decay"], group["lr_scale"], group["lr"])
    return {name: owner[id(p)] for name, p in model.named_parameters()}


def _mmseg_layer_id(name):
    # mmseg get_layer_id_for_vit with max_layer_id = num_layers + 2
    if name in ("backbone.cls_token", "backbone.pos_embed") or name.startswith("backbone.patch_embed"):
        return 0
    if name.startswith("backbone.layers."):
        return int(name.split(".")[2]) + 1
    return NUM_LAYERS + 1


def test_no_weight_decay_on_position_token_bias_table_and_1d_params_with_mmseg_lr_scales():
    model = _model()
    settings = _settings(model, _optimizer(model, "MimLayerDecayOptimizerConstructor"))
    params = dict(model.named_parameters())
    assert set(settings) == set(params)
    tables = [n for n in params if n.endswith("relative_position_bias_table")]
    assert len(tables) == NUM_LAYERS and all(params[n].ndim == 2 for n in tables)
    assert params["backbone.pos_embed"].ndim == 3 and params["backbone.cls_token"].ndim == 3
    for name, (wd, lr_scale, lr) in settings.items():
        exempt = name.endswith(NO_DECAY_SUFFIXES) or name.endswith(".bias") or params[name].ndim == 1
        assert wd == (0.0 if exempt else WD), name
        assert lr_scale == pytest.approx(RATE ** (NUM_LAYERS + 1 - _mmseg_layer_id(name))), name
        assert lr == pytest.approx(BASE_LR * lr_scale), name
    assert settings["backbone.pos_embed"][1] == pytest.approx(RATE ** 5)
    assert settings["decode_head.conv_seg.weight"][:2] == (WD, 1.0)
    assert settings["backbone.layers.3.attn.qkv.weight"][:2] == (WD, pytest.approx(RATE))

    # What AdamW does with it: with zero gradients a step is pure decoupled decay, p *= 1 - lr * wd.
    optimizer = _optimizer(model, "MimLayerDecayOptimizerConstructor")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        wd, _, lr = settings[name]
        assert torch.allclose(p, torch.full_like(p, 1.0 - lr * wd)), name
    assert bool((params["backbone.pos_embed"] == 1.0).all())
    assert bool((params["backbone.layers.0.attn.qkv.weight"] < 1.0).all())


def test_stock_mmseg_constructor_still_decays_pos_embed_cls_token_and_bias_tables():
    # Documents the mmseg 1.x behaviour MimLayerDecayOptimizerConstructor exists for: its
    # `name in ('pos_embed', 'cls_token')` never matches 'backbone.pos_embed'. If this fails,
    # mmseg has fixed it and the project's constructor can go.
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notices
        settings = _settings(model, _optimizer(model, "LayerDecayOptimizerConstructor"))
    assert settings["backbone.pos_embed"][0] == WD
    assert settings["backbone.cls_token"][0] == WD
    assert settings["backbone.layers.0.attn.relative_position_bias_table"][0] == WD
    # the layer-wise lr scales are the same as ours
    ours = _settings(model, _optimizer(model, "MimLayerDecayOptimizerConstructor"))
    assert {n: s[1:] for n, s in settings.items()} == {n: s[1:] for n, s in ours.items()}


def test_library_messages_kept_off_stdout_and_no_deprecation_warnings(capsys):
    model = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _optimizer(model, "MimLayerDecayOptimizerConstructor")
    out = capsys.readouterr().out
    assert "set param" not in out and "Param groups" not in out
    assert not [w for w in caught if "LayerDecayOptimizerConstructor" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _optimizer(model, "LayerDecayOptimizerConstructor")
    assert "set param backbone.pos_embed as id 0" in capsys.readouterr().out  # what the library prints
    assert [w for w in caught if "LayerDecayOptimizerConstructor" in str(w.message)]


def test_decay_rate_key_and_layer_decay_rate_key_give_the_same_groups():
    from mmengine.optim import build_optim_wrapper

    model = _model()
    cfg = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=BASE_LR, weight_decay=WD),
               constructor="MimLayerDecayOptimizerConstructor",
               paramwise_cfg=dict(num_layers=NUM_LAYERS, decay_rate=RATE, decay_type="layer_wise_vit"))
    by_new_key = _settings(model, build_optim_wrapper(model, cfg).optimizer)
    assert by_new_key == _settings(model, _optimizer(model, "MimLayerDecayOptimizerConstructor"))
    assert by_new_key["backbone.pos_embed"][0] == 0.0
