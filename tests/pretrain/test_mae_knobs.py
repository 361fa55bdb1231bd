"""Robust-MAE knobs: each changes only what it should."""
import pytest
import torch

from mimbench.errors import MimbenchError
from pretrain.models.mae import ROBUST_RECIPE, MaskedAutoencoderViT
from pretrain.registry import create_model

CFG = dict(
    img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=4,
    decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2,
)
L = 64


def make(**kw):
    torch.manual_seed(0)
    return MaskedAutoencoderViT(**{**CFG, **kw})


def data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.rand(n, L, generator=g)


# ---------------------------------------------------------------- decoder attention dropout
def test_decoder_attn_drop_only_in_decoder_and_only_in_training():
    base, drop = make(), make(decoder_attn_drop=0.5)
    assert list(base.state_dict()) == list(drop.state_dict())
    drop.load_state_dict(base.state_dict())
    assert all(b.attn.attn_drop.p == 0.5 for b in drop.decoder_blocks)
    assert all(b.attn.attn_drop.p == 0.0 for b in drop.blocks)
    imgs, noise = data()
    base.eval(), drop.eval()
    assert torch.equal(base(imgs, 0.75, noise)[1], drop(imgs, 0.75, noise)[1])
    base.train(), drop.train()
    torch.manual_seed(1)
    p_base = base(imgs, 0.75, noise)[1]
    torch.manual_seed(1)
    p_drop = drop(imgs, 0.75, noise)[1]
    assert not torch.allclose(p_base, p_drop)
    # The encoder output is untouched by the knob, in training mode too.
    assert torch.equal(base.forward_encoder(imgs, 0.75, noise)[0], drop.forward_encoder(imgs, 0.75, noise)[0])


def test_decoder_attn_drop_validation():
    with pytest.raises(MimbenchError, match="decoder_attn_drop"):
        make(decoder_attn_drop=1.0)


# ---------------------------------------------------------------- target normalisation
def test_norm_pix_loss_is_target_norm_patch_and_conflicts_are_errors():
    imgs, noise = data()
    a, b = make(norm_pix_loss=True), make(target_norm="patch")
    assert a.norm_pix_loss and b.norm_pix_loss
    assert a(imgs, 0.75, noise)[0].item() == b(imgs, 0.75, noise)[0].item()
    assert make(target_norm="none")(imgs, 0.75, noise)[0].item() == make()(imgs, 0.75, noise)[0].item()
    with pytest.raises(MimbenchError, match="norm_pix_loss"):
        make(norm_pix_loss=True, target_norm="batch")
    with pytest.raises(MimbenchError, match="target_norm"):
        make(target_norm="layer")


def test_target_modes_only_change_the_target():
    imgs, noise = data()
    ref = make()
    for mode in ("patch", "batch", "ema"):
        m = make(target_norm=mode)
        assert torch.equal(m(imgs, 0.75, noise)[1], ref(imgs, 0.75, noise)[1]), mode  # same predictions
    assert list(make(target_norm="batch").state_dict()) == list(ref.state_dict())
    ema_keys = set(make(target_norm="ema").state_dict()) - set(ref.state_dict())
    assert ema_keys == {"target_normalizer.running_mean", "target_normalizer.running_var", "target_normalizer.num_updates"}


def test_batch_target_loss_against_hand_formula():
    imgs, noise = data(3)
    m = make(target_norm="batch", target_norm_alpha=0.25)
    loss, pred, mask = m(imgs, 0.75, noise)
    x = m.patchify(imgs).double()
    pm, pv = x.mean(-1, keepdim=True), x.var(-1, keepdim=True)
    gm, gv = x.mean(), x.var(unbiased=False)
    t = (x - (0.25 * pm + 0.75 * gm)) / (0.25 * pv + 0.75 * gv + 1e-6).sqrt()
    per_patch = ((pred.double() - t) ** 2).mean(-1)
    expected = (per_patch * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ema_target_statistics_update_in_training_only():
    m = make(target_norm="ema", target_norm_momentum=0.9)
    imgs1, noise = data(2, 1)
    imgs2 = imgs1 * 2 + 1
    m.train()
    m(imgs1, 0.75, noise)
    x1 = m.patchify(imgs1).double()
    assert m.target_normalizer.running_mean.item() == pytest.approx(x1.mean().item(), rel=1e-5)
    m(imgs2, 0.75, noise)
    x2 = m.patchify(imgs2).double()
    exp_mean = 0.9 * x1.mean() + 0.1 * x2.mean()
    exp_var = 0.9 * x1.var(unbiased=False) + 0.1 * x2.var(unbiased=False)
    assert m.target_normalizer.running_mean.item() == pytest.approx(exp_mean.item(), rel=1e-5)
    assert m.target_normalizer.running_var.item() == pytest.approx(exp_var.item(), rel=1e-5)
    assert int(m.target_normalizer.num_updates) == 2
    m.eval()
    before = m.target_normalizer.running_mean.clone()
    m(imgs1 * 10, 0.75, noise)
    assert torch.equal(before, m.target_normalizer.running_mean)
    with pytest.raises(MimbenchError, match="running statistics"):
        make(target_norm="ema").eval()(imgs1, 0.75, noise)


# ---------------------------------------------------------------- encoder mask tokens
def test_mask_token_defaults_reproduce_plain_mae_exactly():
    imgs, noise = data()
    plain = make()
    knob = make(mask_token_layer=3, mask_token_ratio=0.0)
    assert knob.encoder_mask_token is None
    assert list(knob.state_dict()) == list(plain.state_dict())
    for a, b in zip(plain.state_dict().values(), knob.state_dict().values()):
        assert torch.equal(a, b)  # same seeded init
    lp, pp, mp = plain(imgs, 0.75, noise)
    lk, pk, mk = knob(imgs, 0.75, noise)
    assert lp.item() == lk.item() and torch.equal(pp, pk) and torch.equal(mp, mk)


def test_mask_token_ratio_one_at_layer_zero_inserts_every_masked_position():
    imgs, noise = data()
    m = make(mask_token_layer=0, mask_token_ratio=1.0).eval()
    assert "encoder_mask_token" in dict(m.named_parameters())
    latent, mask, ids_restore = m.forward_encoder(imgs, 0.75, noise)
    assert latent.shape == (2, 1 + L, 32)
    assert mask.sum(1).tolist() == [48.0, 48.0]  # the loss still covers every masked patch
    # The decoder's own mask token is never used: every position comes from the encoder.
    pred = m(imgs, 0.75, noise)[1]
    with torch.no_grad():
        m.mask_token.add_(5.0)
    assert torch.equal(pred, m(imgs, 0.75, noise)[1])


def test_partial_ratio_inserts_lowest_noise_masked_positions():
    imgs, noise = data()
    # Layer == depth: inserted tokens skip every block, so their output is norm(token + pos).
    m = make(mask_token_layer=3, mask_token_ratio=0.25).eval()
    latent, mask, _ = m.forward_encoder(imgs, 0.75, noise)
    n_ins = round(48 * 0.25)
    assert latent.shape == (2, 1 + 16 + n_ins, 32)
    for i in range(2):
        order = torch.argsort(noise[i])
        ids = order[16 : 16 + n_ins]
        assert torch.all(mask[i, ids] == 1)
        expected = m.norm(m.encoder_mask_token[0] + m.pos_embed[0, 1 + ids])
        assert torch.allclose(latent[i, 17:], expected, atol=1e-6)
    # Inserted at layer 1, the tokens change the visible tokens' encoder output from block 1 on.
    m1 = make(mask_token_layer=1, mask_token_ratio=0.25).eval()
    ref = make().eval()
    _, _, _, f1 = m1.forward_encoder(imgs, 0.75, noise, return_layers=(0, 1))
    _, _, _, fr = ref.forward_encoder(imgs, 0.75, noise, return_layers=(0, 1))
    assert torch.equal(f1[0], fr[0]) and f1[1].shape[1] == 17 + n_ins
    assert not torch.allclose(f1[1][:, :17], fr[1])


def test_mask_token_validation():
    with pytest.raises(MimbenchError, match="mask_token_layer"):
        make(mask_token_layer=4)
    with pytest.raises(MimbenchError, match="mask_token_ratio"):
        make(mask_token_ratio=1.5)


def test_robust_recipe_preset():
    m = create_model("robust_mae_vit_micro_patch4_32")
    assert m.decoder_blocks[0].attn.attn_drop.p == ROBUST_RECIPE["decoder_attn_drop"]
    assert m.target_normalizer.mode == ROBUST_RECIPE["target_norm"]
    assert m.mask_token_layer == 2 and m.mask_token_ratio == ROBUST_RECIPE["mask_token_ratio"]
    override = create_model("robust_mae_vit_micro_patch4_32", mask_token_ratio=0.0, target_norm="batch")
    assert override.encoder_mask_token is None and override.target_normalizer.mode == "batch"
    assert create_model("robust_mae_vit_micro_patch4_32", norm_pix_loss=True).target_normalizer.mode == "patch"
    imgs, noise = data()
    loss, pred, mask = m.train()(imgs, 0.75, noise)
    loss.backward()
    assert m.encoder_mask_token.grad is not None and m.encoder_mask_token.grad.abs().sum() > 0
