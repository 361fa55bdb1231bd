"""MAE model: official layout, masking semantics, loss, encoder export."""
import math

import pytest
import timm
import torch
from torch import nn

from pretrain.registry import create_model, list_models
from mimbench.errors import MimbenchError
from pretrain.models.mae import LayerNorm6, MaskedAutoencoderViT, sincos_pos_embed_2d

# Small config used throughout: 8x8 grid of 4x4 patches, encoder 32-d x 2, decoder 16-d x 1.
CFG = dict(
    img_size=32, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=4,
    decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0,
)
L, P = 64, 4 * 4 * 3


def make(**kw):
    torch.manual_seed(0)
    return MaskedAutoencoderViT(**{**CFG, **kw})


def block_keys(prefix, i):
    return [
        f"{prefix}.{i}.{k}"
        for k in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
            "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        )
    ]


# The official models_mae.MaskedAutoencoderViT state dict for CFG, written out by hand from its
# structure (own parameters first in registration order, then sub-modules).
OFFICIAL_KEYS = (
    ["cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    + block_keys("blocks", 0) + block_keys("blocks", 1)
    + ["norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias"]
    + block_keys("decoder_blocks", 0)
    + ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
)
OFFICIAL_SHAPES = {
    "cls_token": (1, 1, 32), "pos_embed": (1, 65, 32), "mask_token": (1, 1, 16), "decoder_pos_embed": (1, 65, 16),
    "patch_embed.proj.weight": (32, 3, 4, 4), "blocks.0.attn.qkv.weight": (96, 32), "blocks.1.mlp.fc1.weight": (128, 32),
    "decoder_embed.weight": (16, 32), "decoder_blocks.0.attn.qkv.weight": (48, 16), "decoder_pred.weight": (48, 16),
}


def test_state_dict_keys_are_official_and_strict_loading(tmp_path):
    model = make()
    sd = model.state_dict()
    assert list(sd) == OFFICIAL_KEYS
    for k, shape in OFFICIAL_SHAPES.items():
        assert tuple(sd[k].shape) == shape, k
    # An "official checkpoint": {"model": state dict}, loaded without unpickling code.
    torch.manual_seed(1)
    ckpt = {"model": {k: torch.randn_like(v) for k, v in sd.items()}, "epoch": 799}
    torch.save(ckpt, tmp_path / "mae.pth")
    loaded = torch.load(tmp_path / "mae.pth", weights_only=True)
    result = model.load_state_dict(loaded["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.blocks[1].attn.qkv.weight, ckpt["model"]["blocks.1.attn.qkv.weight"])


def test_forward_shapes_and_loss_terms():
    model = make()
    imgs = torch.randn(3, 3, 32, 32)
    loss, pred, mask = model(imgs)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (3, L, P) and mask.shape == (3, L)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert model.loss_terms == {"loss_rec": pytest.approx(loss.item())}
    model.on_step_end(0, 10)  # no-op, must not fail


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_lowest_noise_patches(ratio):
    model = make()
    n = 4
    noise = torch.rand(n, L, generator=torch.Generator().manual_seed(3))
    latent, mask, ids_restore = model.forward_encoder(torch.randn(n, 3, 32, 32), ratio, noise)
    keep = int(L * (1 - ratio))
    assert latent.shape == (n, 1 + keep, 32)
    assert (mask == 0).sum(1).tolist() == [keep] * n  # 1 = removed
    for i in range(n):
        kept = set(torch.argsort(noise[i])[:keep].tolist())
        assert set(torch.nonzero(mask[i] == 0).flatten().tolist()) == kept
    # ids_restore is the inverse of the noise order.
    assert torch.equal(torch.argsort(noise, 1)[torch.arange(n)[:, None], ids_restore], torch.arange(L).expand(n, L))


def test_noise_fixes_mask_and_loss():
    model = make()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, L)
    l1, p1, m1 = model(imgs, 0.75, noise)
    l2, p2, m2 = model(imgs, 0.75, noise.clone())
    assert torch.equal(m1, m2) and torch.equal(p1, p2) and l1.item() == l2.item()
    _, _, m3 = model(imgs, 0.75, torch.rand(2, L))
    assert not torch.equal(m1, m3)


def reference_forward(model, imgs, noise, mask_ratio):
    """Per-sample re-implementation with explicit index lists (no argsort/gather tricks)."""
    p, g = 4, 8
    keep = int(L * (1 - mask_ratio))
    losses, masks = [], []
    for i in range(imgs.shape[0]):
        order = sorted(range(L), key=lambda j: noise[i, j].item())
        kept = sorted(order[:keep])  # any order of visible tokens gives the same result
        tokens = model.patch_embed(imgs[i : i + 1])[0] + model.pos_embed[0, 1:]
        x = torch.cat([model.cls_token[0] + model.pos_embed[0, :1], tokens[kept]])[None]
        for blk in model.blocks:
            x = blk(x)
        x = model.decoder_embed(model.norm(x))[0]
        full = [model.mask_token[0, 0]] * L
        for t, j in enumerate(kept):
            full[j] = x[1 + t]
        y = torch.stack([x[0]] + full)[None] + model.decoder_pos_embed
        for blk in model.decoder_blocks:
            y = blk(y)
        pred = model.decoder_pred(model.decoder_norm(y))[0, 1:]
        per_patch = []
        for j in range(L):
            r, c = divmod(j, g)
            patch = imgs[i, :, r * p : (r + 1) * p, c * p : (c + 1) * p].permute(1, 2, 0).reshape(-1)
            if model.norm_pix_loss:
                patch = (patch - patch.mean()) / math.sqrt(patch.var().item() + 1e-6)
            per_patch.append(((pred[j] - patch) ** 2).mean())
        masked = [j for j in range(L) if j not in kept]
        losses.extend(per_patch[j] for j in masked)
        masks.append([0.0 if j in kept else 1.0 for j in range(L)])
    return torch.stack(losses).mean(), torch.tensor(masks)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_matches_straightforward_recomputation(norm_pix_loss):
    model = make(norm_pix_loss=norm_pix_loss).eval()
    torch.manual_seed(5)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, L)
    loss, _, mask = model(imgs, 0.75, noise)
    ref_loss, ref_mask = reference_forward(model, imgs, noise, 0.75)
    assert torch.equal(mask, ref_mask)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)


def test_loss_ignores_visible_patches():
    model = make()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, L)
    _, pred, mask = model(imgs, 0.75, noise)
    pred = pred.detach().requires_grad_(True)
    loss = model.forward_loss(imgs, pred, mask)
    loss.backward()
    grad_per_patch = pred.grad.abs().sum(-1)
    assert torch.all(grad_per_patch[mask == 0] == 0)
    assert torch.all(grad_per_patch[mask == 1] > 0)
    # Predictions (and target pixels) at visible positions do not enter the loss.
    pred2 = pred.detach().clone()
    pred2[mask == 0] += 100.0
    assert model.forward_loss(imgs, pred2, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    patches = model.patchify(imgs)
    patches[mask == 0] = 7.0
    assert model.forward_loss(model.unpatchify(patches), pred, mask).item() == pytest.approx(loss.item(), rel=1e-6)


def test_patchify_order_and_roundtrip():
    model = make()
    imgs = torch.randn(2, 3, 32, 32)
    x = model.patchify(imgs)
    # patch (row 1, col 2), pixel (0, 1), channel 2 -> index ((0 * 4) + 1) * 3 + 2
    assert x[0, 1 * 8 + 2, (0 * 4 + 1) * 3 + 2] == imgs[0, 2, 4 + 0, 8 + 1]
    assert torch.equal(model.unpatchify(x), imgs)


def test_init_follows_official_recipe():
    model = make()
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(32))
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            bound = math.sqrt(6 / (mod.in_features + mod.out_features))
            assert mod.weight.abs().max() <= bound and mod.weight.abs().max() > 0.8 * bound, name
            assert torch.all(mod.bias == 0), name
        elif isinstance(mod, nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0) and mod.eps == 1e-5
    w = model.patch_embed.proj.weight
    bound = math.sqrt(6 / (w[0].numel() + w.shape[0]))  # xavier on the flattened (D, C*p*p) kernel
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    big = torch.cat([model.cls_token.flatten(), model.mask_token.flatten()])
    assert 0.01 < big.std().item() < 0.03


def test_sincos_pos_embed_formula():
    d, g = 16, 4
    emb = sincos_pos_embed_2d(d, g, cls_token=True)
    assert emb.shape == (17, 16) and emb.dtype == torch.float32 and torch.all(emb[0] == 0)
    row, col = 2, 3
    omega = [1.0 / 10000 ** (k / 4) for k in range(4)]
    expected = (
        [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
        + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
    )
    assert torch.allclose(emb[1 + row * g + col], torch.tensor(expected), atol=1e-7)
    with pytest.raises(MimbenchError):
        sincos_pos_embed_2d(6, 2)


def test_encoder_state_dict_loads_into_timm_vit_with_same_features():
    for kw in ({}, dict(mask_token_layer=1, mask_token_ratio=0.5)):
        model = make(norm_layer=LayerNorm6, **kw).eval()
        sd = model.encoder_state_dict()
        assert "encoder_mask_token" not in sd and not any(k.startswith("decoder") for k in sd)
        arch = model.encoder_arch()
        assert arch == dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4.0)
        vit = timm.models.vision_transformer.VisionTransformer(num_classes=0, qkv_bias=True, **arch).eval()
        vit.load_state_dict(sd, strict=True)
        imgs = torch.randn(2, 3, 32, 32)
        latent, _, _ = model.forward_encoder(imgs, 0.0, noise=torch.arange(L, dtype=torch.float).expand(2, L))
        assert torch.allclose(vit.forward_features(imgs), latent, atol=1e-5)


def test_return_layers_and_decoder_on_intermediate_tokens():
    model = make(depth=3).eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, L)
    latent, mask, ids_restore, feats = model.forward_encoder(imgs, 0.75, noise, return_layers=(0, -1))
    assert [f.shape for f in feats] == [(2, 17, 32)] * 2
    assert torch.allclose(model.norm(feats[1]), latent)
    plain = model.forward_encoder(imgs, 0.75, noise)
    assert torch.equal(plain[0], latent)
    pred = model.forward_decoder(feats[0], ids_restore)
    assert pred.shape == (2, L, P)
    with pytest.raises(MimbenchError):
        model.forward_encoder(imgs, 0.75, noise, return_layers=(3,))


def test_no_weight_decay_names_exist():
    model = make(mask_token_layer=1, mask_token_ratio=0.5)
    names = dict(model.named_parameters())
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "mask_token", "decoder_pos_embed", "encoder_mask_token"}
    assert model.no_weight_decay() <= set(names)


def test_bad_inputs_raise_clear_errors():
    model = make()
    with pytest.raises(MimbenchError, match="shape"):
        model(torch.randn(2, 3, 16, 16))
    with pytest.raises(MimbenchError, match="noise"):
        model(torch.randn(2, 3, 32, 32), 0.75, noise=torch.rand(2, 10))
    with pytest.raises(MimbenchError, match="mask_ratio"):
        model(torch.randn(2, 3, 32, 32), 1.0)
    with pytest.raises(MimbenchError):
        make(img_size=30)


def test_registry_presets_and_errors():
    names = list_models()
    for n in ("mae", "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14",
              "mae_vit_tiny_patch4_32", "mae_vit_micro_patch4_32"):
        assert n in names
    expected = {
        "mae_vit_base_patch16": (16, 768, 12, 12, 512, 8, 16),
        "mae_vit_large_patch16": (16, 1024, 24, 16, 512, 8, 16),
        "mae_vit_huge_patch14": (14, 1280, 32, 16, 512, 8, 16),
        "mae_vit_tiny_patch4_32": (4, 128, 6, 4, 64, 2, 4),
        "mae_vit_micro_patch4_32": (4, 64, 4, 4, 32, 1, 4),
    }
    for name, (p, d, depth, h, dd, ddepth, dh) in expected.items():
        with torch.device("meta"):  # shapes only, no memory or init cost
            m = create_model(name)
        assert (m.patch_size, m.embed_dim, len(m.blocks), m.num_heads) == (p, d, depth, h), name
        assert (m.decoder_embed.out_features, len(m.decoder_blocks)) == (dd, ddepth), name
        assert m.decoder_blocks[0].attn.num_heads == dh and m.norm.eps == 1e-6 and m.blocks[0].attn.qkv.bias is not None
    with pytest.raises(MimbenchError, match="mae_vit_base_patch16"):
        create_model("mae_vit_gigantic")
    with pytest.raises(MimbenchError, match="decoder_attn_drop"):
        create_model("mae_vit_micro_patch4_32", decoder_atn_drop=0.1)


def test_package_level_create_model(tmp_path):
    # In a fresh interpreter (tests/pretrain/ would shadow the package name inside pytest).
    import subprocess
    import sys

    code = (
        "import pretrain, torch; m = pretrain.create_model('mae_vit_micro_patch4_32');"
        "print(type(m).__name__, 'mae' in pretrain.list_models())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["MaskedAutoencoderViT", "True"]
